"""The wire format of the cascade server: OpenAI's completions API, field by field, plus the routing fields.

Validation, the 4xx messages and the OpenAPI document all come from these
pydantic models. Limits that depend on the deployment (the largest
`max_tokens`, the longest prompt) are checked by the ingress against its
config, so that the schema stays the same for every deployment.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 4  # as OpenAI


class CompletionRequest(BaseModel):
    """POST /v1/completions. Unknown fields are refused (naming them) rather than silently ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("cascade", description="`cascade` (default), `cascade@fraction=F`, `cascade@threshold=T`, "
                                              "`cascade-posthoc`, `cascade-posthoc@confidence=C`, or a tier name "
                                              "(`small`, `large`).")
    prompt: str = Field(..., description="The prompt text (a single string).")
    max_tokens: int = Field(16, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = Field(None, description="Up to 4 strings; the text stops before the "
                                                                    "first one generated.")
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1, description="Same seed, same sampled tokens.")
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="Only 1 completion per request is supported.")
    user: Optional[str] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_is_text(cls, value: object) -> object:
        # OpenAI also accepts token arrays and lists of prompts; this server takes one string.
        if not isinstance(value, str):
            raise ValueError("must be a string")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: Optional[Union[str, list[str]]]) -> Optional[Union[str, list[str]]]:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: Optional[Literal["stop", "length"]]


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
    routed_to: str = Field(..., description="The tier that produced the answer.")
    difficulty: Optional[float] = Field(None, description="The router's score of the prompt: the estimated "
                                                          "probability that the large tier answers better.")
    escalated: bool = Field(False, description="The small tier answered first and, its confidence being low, "
                                               "the query went on to the large tier (post-hoc mode).")
    degraded: bool = Field(False, description="The chosen tier failed or timed out; a smaller one answered.")
    confidence: Optional[float] = Field(None, description="Mean token probability of the answer (post-hoc mode).")


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
