"""Chat for base models: the messages of a conversation rendered into one prompt by a chat template.

Templates are Jinja2, sandboxed, with Hugging Face's variables (`messages`
with `role` and `content`, `add_generation_prompt`, `bos_token`,
`eos_token`, `raise_exception`), so a checkpoint's own chat template can be
pasted into `chat.template`. The tiers are base models: the default template
writes plain "Role: text" turns and ends with "Assistant:", and the default
stop strings end the answer where the model would begin the next turn.
"""

from __future__ import annotations

from typing import Any

DEFAULT_TEMPLATE = ("{% for message in messages %}{{ message.role | capitalize }}: {{ message.content }}\n\n"
                    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
DEFAULT_STOP = ("\nUser:", "\nSystem:")


class TemplateError(ValueError):
    """A template that does not compile, or that refused a conversation (`raise_exception`)."""


def _raise(message: str) -> None:
    raise TemplateError(message)


class ChatTemplate:
    """A compiled chat template.

    Args:
        source: the Jinja2 template text.
        eos_token: the tiers' end-of-text token, for templates that write it.

    Raises:
        TemplateError: the template does not compile (the message says where).
    """

    def __init__(self, source: str, eos_token: str) -> None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise
        try:
            self.template = environment.from_string(source)
        except jinja2.TemplateError as err:
            raise TemplateError(f"not a valid Jinja2 template: {err}") from None
        self.eos_token = eos_token

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt of a conversation, ready for the assistant's turn."""
        import jinja2

        try:
            return self.template.render(messages=messages, add_generation_prompt=True, bos_token="",
                                        eos_token=self.eos_token)
        except jinja2.TemplateError as err:
            raise TemplateError(str(err)) from None
