"""The `model` field of a request: which routing mode, with which threshold.

    cascade                       pre-generation routing, the deployment's threshold
    cascade@fraction=0.2          the threshold calibrated for 20% large-tier calls
    cascade@threshold=0.6         an explicit threshold on the router's score
    cascade@budget=0.5            the most large-tier calls whose mean cost per query stays within 50% of
                                  answering everything with the large tier (costs: active parameters)
    cascade-posthoc               the small tier answers first; escalate when the router's post-hoc rule
                                  says so (its token-level deferral rule, else the mean token confidence)
    cascade-posthoc@fraction=F    ... at the threshold calibrated to escalate a fraction F of answers
    cascade-posthoc@confidence=C  ... when the mean token probability is below C
    small, large                  that tier only
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

TIERS = ("small", "large")
CASCADE, POSTHOC = "cascade", "cascade-posthoc"
_OPTIONS = {CASCADE: ("fraction", "threshold", "budget"), POSTHOC: ("confidence", "fraction")}


class UnknownModelError(ValueError):
    """The request's `model` names no tier or routing mode of this server."""


@dataclass(frozen=True)
class Mode:
    kind: str                       # "tier", CASCADE or POSTHOC
    tier: Optional[str] = None      # for kind == "tier"
    option: Optional[str] = None    # "fraction", "threshold", "budget" or "confidence"
    value: Optional[float] = None


def parse_model(name: str) -> Mode:
    """Parses the `model` field; UnknownModelError with the accepted forms otherwise."""
    if name in TIERS:
        return Mode("tier", tier=name)
    base, _, option = name.partition("@")
    if base not in _OPTIONS:
        raise UnknownModelError(f"model: unknown model {name!r}; use one of {', '.join(available_models())}, "
                                f"or cascade@fraction=F, cascade@threshold=T, cascade@budget=B, "
                                f"cascade-posthoc@confidence=C, cascade-posthoc@fraction=F")
    if not option:
        return Mode(base)
    key, _, raw = option.partition("=")
    if key not in _OPTIONS[base]:
        raise UnknownModelError(f"model: {base} takes {' or '.join(o + '=' for o in _OPTIONS[base])}, got {option!r}")
    try:
        value = float(raw)
    except ValueError:
        raise UnknownModelError(f"model: {key} must be a number, got {raw!r}") from None
    if not 0.0 <= value <= 1.0:
        raise UnknownModelError(f"model: {key} must lie in [0, 1], got {value}")
    return Mode(base, option=key, value=value)


def available_models() -> list[str]:
    return [CASCADE, POSTHOC, *TIERS]
