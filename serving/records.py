"""The records that cross the Ray Serve boundary between the ingress and a tier (STYLE: typed, never string keys).

`TierRequest` goes in (`Tier.generate`, `Tier.stream`, `EndpointTier.generate`,
`EndpointTier.stream`), `TierAnswer` comes out; a stream yields `StreamDelta`s
and then its `TierAnswer`. `Routed` is the ingress's own record of an answer
and how it was routed (which tier answered, the difficulty score, degraded,
escalated); it never crosses a process boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class TierRequest:
    """One prompt's generation request, as the ingress validated it."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # ids of the cascade's vocabulary
    top_logprobs: int = 0  # alternatives per position returned (0: the chosen token's log-probability only)
    ignore_eos: bool = False
    seed: Optional[int] = None
    echo: bool = False  # the prompt's own log-probabilities too

    def sampling_params(self) -> Any:
        """The `moe.generate.SamplingParams` of this request."""
        from moe.generate import SamplingParams

        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed, stop=tuple(self.stop), presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, logit_bias=tuple(self.logit_bias.items()),
                              top_logprobs=self.top_logprobs, ignore_eos=self.ignore_eos)


@dataclass
class TierAnswer:
    """One completion of a tier.

    `token_ids` are the cascade's ids (empty from an external tier, whose own
    tokens come as `token_texts`); `top_logprobs` holds per position the most
    likely (token id or text, log p), likeliest first. With echo,
    `prompt_logprobs`/`prompt_top_logprobs` cover the prompt's tokens after the
    first (and `prompt_token_texts` lists an external tier's prompt tokens).
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    confidence: float  # the mean token probability (post-hoc escalation reads it)
    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[Any, float]]] = field(default_factory=list)
    latency_s: float = 0.0
    prompt_logprobs: Optional[list[float]] = None
    prompt_top_logprobs: Optional[list[list[tuple[Any, float]]]] = None
    token_texts: Optional[list[str]] = None
    prompt_token_texts: Optional[list[str]] = None

    @property
    def mean_logprob(self) -> float:
        """best_of's ranking: the mean log-probability of the answer's tokens (0, i.e. certain, when empty)."""
        return sum(self.token_logprobs) / len(self.token_logprobs) if self.token_logprobs else 0.0


@dataclass(frozen=True)
class StreamDelta:
    """A piece of a streamed answer's text."""

    text: str


@dataclass
class Routed:
    """An answer and how the cascade routed it (the ingress's own record)."""

    answer: TierAnswer
    tier: str  # the tier that answered
    difficulty: Optional[float] = None  # the router's score, or the deferral rule's in post-hoc mode
    degraded: bool = False  # another tier failed first
    escalated: bool = False  # post-hoc: the small answer was escalated
    confidence: Optional[float] = None  # post-hoc escalation: the small answer's confidence; else the answer's

    def routing(self) -> dict[str, Any]:
        """The routing fields every answer and chunk carries."""
        return {"routed_to": self.tier, "difficulty": self.difficulty, "escalated": self.escalated,
                "degraded": self.degraded}
