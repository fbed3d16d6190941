"""Chat templates (serving/chat.py) and their config checks, without Ray."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from serving.chat import DEFAULT_STOP, DEFAULT_TEMPLATE, ChatTemplate, TemplateError
from serving.config import register_configs, validate_serve_config
from train_helpers import ROOT

register_configs()

# A Hugging Face style template: special markers, the EOS token, and raise_exception for a refused role.
MARKED = ("{% for m in messages %}{% if m.role == 'system' and not loop.first %}"
          "{{ raise_exception('a system message must come first') }}{% endif %}"
          "<|{{ m.role }}|>{{ m.content }}{{ eos_token }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_default_template_writes_plain_turns_for_a_base_model() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a router?"},
                {"role": "assistant", "content": "It picks experts."}, {"role": "user", "content": "How many?"}]
    assert ChatTemplate(DEFAULT_TEMPLATE, eos_token="</s>").render(messages) == (
        "System: Be brief.\n\nUser: What is a router?\n\nAssistant: It picks experts.\n\nUser: How many?\n\n"
        "Assistant:")
    assert all(stop.startswith("\n") for stop in DEFAULT_STOP), "a stop ends the answer before the next turn"


def test_hugging_face_style_templates_render_and_refuse() -> None:
    template = ChatTemplate(MARKED, eos_token="</s>")
    assert template.render([{"role": "user", "content": "hi"}]) == "<|user|>hi</s>\n<|assistant|>"
    with pytest.raises(TemplateError, match="a system message must come first"):
        template.render([{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}])
    with pytest.raises(TemplateError, match="not a valid Jinja2 template"):
        ChatTemplate("{% for m in messages %}", eos_token="")
    with pytest.raises(TemplateError):  # the sandbox: no reaching into Python objects
        ChatTemplate("{{ messages.__class__.__mro__ }}", eos_token="").render([])


@pytest.mark.parametrize("override,key", [("chat.template='{% if %}'", "chat.template"),
                                          ("chat.stop=[a,b,c,d,e]", "chat.stop"),
                                          ("chat.stop=['']", "chat.stop")])
def test_bad_chat_config_names_the_key(override: str, key: str) -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="serve", overrides=["small=a", "large=b", override])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate_serve_config(cfg)
