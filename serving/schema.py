"""The wire format of the cascade server: OpenAI's completions API, field by field, plus the routing fields.

Validation, the 4xx messages and the OpenAPI document all come from these
pydantic models. Limits that depend on the deployment (the largest
`max_tokens`, the longest prompt) are checked by the ingress against its
config, so that the schema stays the same for every deployment.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_PROMPTS = 32  # prompts in one request (a list of prompts is a batch)
MAX_CHOICES = 8  # n and best_of
MAX_LOGPROBS = 5  # as OpenAI's completions

Prompt = Union[str, list[str], list[int], list[list[int]]]


def check_stop_strings(value: Optional[Union[str, list[str]]]) -> Optional[Union[str, list[str]]]:
    stops = [value] if isinstance(value, str) else (value or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    if any(s == "" for s in stops):
        raise ValueError("stop strings must not be empty")
    return value


def check_logit_bias(value: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
    for token, bias in (value or {}).items():
        if not token.isdigit():
            raise ValueError(f"keys must be token ids, got {token!r}")
        if not -100 <= bias <= 100:
            raise ValueError(f"biases must lie in [-100, 100], got {bias} for token {token}")
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="A last chunk, before [DONE], with the request's usage and "
                                                   "no choices.")


class CompletionRequest(BaseModel):
    """POST /v1/completions. Unknown fields are refused (naming them) rather than silently ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("cascade", description="`cascade` (default), `cascade@fraction=F`, `cascade@threshold=T`, "
                                              "`cascade-posthoc`, `cascade-posthoc@confidence=C`, or a tier name "
                                              "(`small`, `large`).")
    prompt: Prompt = Field(..., description="A string, a list of token ids, or a list of either (a batch: one "
                                            "choice per prompt and `n`, each prompt routed on its own).")
    max_tokens: int = Field(16, ge=0, description="Tokens to generate at most (0 only with echo).")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = Field(None, description="Up to 4 strings; the text stops before the "
                                                                    "first one generated.")
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1, description="Same seed, same sampled tokens.")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Completions per prompt.")
    best_of: Optional[int] = Field(None, ge=1, le=MAX_CHOICES,
                                   description="Candidates generated per prompt (>= n); the n with the highest "
                                               "mean token log-probability are returned. Not with stream.")
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS,
                                    description="Log-probabilities of the generated tokens and of the this many "
                                                "most likely tokens at each position (the answering tier's).")
    echo: bool = Field(False, description="Return the prompt before the completion, and with `logprobs` its "
                                          "tokens' log-probabilities too (max_tokens 0: the prompt only). "
                                          "Not with stream.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    ignore_eos: bool = Field(False, description="vLLM's extension: generate past the end-of-text token, up to "
                                                "max_tokens (load tools such as guidellm ask for exact lengths).")
    logit_bias: Optional[dict[str, float]] = Field(None, description="Token id (as a string) -> bias in "
                                                                     "[-100, 100] added to its logit.")
    user: Optional[str] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: object) -> object:
        def token_ids(items: list) -> bool:
            return all(isinstance(t, int) and not isinstance(t, bool) for t in items)

        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not value:
            raise ValueError("must be a string, a list of token ids, or a non-empty list of either")
        if token_ids(value):
            return value
        if len(value) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request, got {len(value)}")
        if all(isinstance(p, str) for p in value) or all(isinstance(p, list) and token_ids(p) for p in value):
            return value
        raise ValueError("a list must hold token ids (integers), strings, or lists of token ids, one kind only")

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        return check_logit_bias(value)

    def prompts(self) -> list[Union[str, list[int]]]:
        """The batch: a single prompt (text or token ids) is a batch of one."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: Optional[Union[str, list[str]]]) -> Optional[Union[str, list[str]]]:
        return check_stop_strings(value)

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class LogProbs(BaseModel):
    """OpenAI's completions logprobs; `text_offset` counts characters from the start of `text`."""

    tokens: list[str]
    token_logprobs: list[Optional[float]] = Field(..., description="With echo the first prompt token's is null.")
    top_logprobs: Optional[list[Optional[dict[str, float]]]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: Optional[LogProbs] = None
    finish_reason: Optional[Literal["stop", "length"]]
    routed_to: Optional[str] = Field(None, description="The tier that produced this choice.")
    difficulty: Optional[float] = None
    escalated: bool = False
    degraded: bool = False


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    """The OpenAI completion object, plus where the cascade sent the query and why."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
    routed_to: str = Field(..., description="The tier that produced the answer (`mixed` when the choices of a "
                                            "batch came from both; each choice names its own).")
    difficulty: Optional[float] = Field(None, description="The router's score of the prompt: the estimated "
                                                          "probability that the large tier answers better "
                                                          "(a batch: the first prompt's; each choice has its own).")
    escalated: bool = Field(False, description="The small tier answered first and, its confidence being low, "
                                               "the query went on to the large tier (post-hoc mode; a batch: any).")
    degraded: bool = Field(False, description="The chosen tier failed or timed out; a smaller one answered "
                                              "(a batch: any).")
    confidence: Optional[float] = Field(None, description="Mean token probability of the answer (post-hoc mode; "
                                                          "a batch: the first choice's).")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moe-ray"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---- chat completions --------------------------------------------------------------------

class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A message of the conversation; tool and function messages are refused (these tiers call no tools)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions: the messages rendered by the deployment's chat template, then generated and
    routed as a completion is. Unknown fields are refused, naming them."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("cascade", description="As for /v1/completions.")
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1, description="Deprecated by OpenAI for max_completion_tokens.")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="Default: as many as the server's limit "
                                                                         "and the context leave.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    ignore_eos: bool = Field(False, description="vLLM's extension: generate past the end-of-text token, up to "
                                                "max_tokens (load tools such as guidellm ask for exact lengths).")
    logit_bias: Optional[dict[str, float]] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS, description="Needs logprobs: true.")
    user: Optional[str] = None
    # Accepted so that a client's defaults pass; anything but "no tools" and plain text is refused, naming it.
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list[Any]] = None
    function_call: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: Optional[Union[str, list[str]]]) -> Optional[Union[str, list[str]]]:
        return check_stop_strings(value)

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        return check_logit_bias(value)

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatLogProb(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogProb(ChatLogProb):
    top_logprobs: list[ChatLogProb]


class ChatLogProbs(BaseModel):
    content: list[ChatTokenLogProb]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogProbs] = None
    finish_reason: Optional[Literal["stop", "length"]]
    routed_to: Optional[str] = None
    difficulty: Optional[float] = None
    escalated: bool = False
    degraded: bool = False


class ChatCompletionResponse(BaseModel):
    """OpenAI's chat.completion object, plus the routing fields of `CompletionResponse`."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    routed_to: str
    difficulty: Optional[float] = None
    escalated: bool = False
    degraded: bool = False
    confidence: Optional[float] = None
