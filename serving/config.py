"""Structured configs of `python -m moe.serve`, registered with Hydra's ConfigStore.

conf/serve.yaml extends `base_serve`, so a misspelt key fails at composition;
`validate_serve_config` checks values and names the key, before Ray starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING, DictConfig


@dataclass
class AutoscalingConfig:
    """Ray Serve autoscaling of one tier (used when `enabled`; otherwise `num_replicas` is fixed)."""

    enabled: bool = False
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4.0


@dataclass
class TierConfig:
    """One tier deployment.

    Attributes:
        num_replicas: fixed replica count (without autoscaling).
        num_cpus / num_gpus: Ray resources of each replica (torch uses num_cpus threads).
        max_batch_size / batch_wait_timeout_s: `@serve.batch` of generation and prefill.
        dtype: float32 or bfloat16 weights.
        fault: drills only: "error" makes every call fail, "hang" makes it never answer.
    """

    num_replicas: int = 1
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    dtype: str = "float32"
    fault: Optional[str] = None


@dataclass
class TiersConfig:
    small: TierConfig = field(default_factory=TierConfig)
    large: TierConfig = field(default_factory=TierConfig)


@dataclass
class RoutingConfig:
    """How the cascade routes, and the request limits the ingress enforces.

    Attributes:
        router: router.json written by `python -m moe.calibrate`; null: calibrate
            the pair on first start and cache it under `calibration_root`.
        target_large_fraction: when set, overrides the router's threshold with the
            one calibrated for this share of large-tier calls.
        threshold: when set, an explicit threshold on the router's score.
        cost_budget: when set, the mean cost per query allowed, as a share of
            answering everything with the large tier (costs: active parameters);
            the most large-tier calls that fit, by the calibrated fractions.
        posthoc_confidence: the small answer's mean token probability below which
            `cascade-posthoc` escalates; null: the calibrated one.
        large_timeout_s: a large-tier call slower than this is answered by the small tier (degraded).
        max_tokens_limit: the largest `max_tokens` a request may ask for.
        max_prompt_chars: longer prompts are refused before tokenizing.
        max_body_bytes: larger request bodies are refused (413).
    """

    router: Optional[str] = None
    calibration_root: str = "runs/cascade"
    target_large_fraction: Optional[float] = None
    threshold: Optional[float] = None
    cost_budget: Optional[float] = None
    posthoc_confidence: Optional[float] = None
    large_timeout_s: float = 60.0
    max_tokens_limit: int = 256
    max_prompt_chars: int = 20000
    max_body_bytes: int = 1 << 20


@dataclass
class IngressConfig:
    """The router deployment (FastAPI ingress).

    Attributes:
        max_ongoing_requests: requests one ingress replica holds at once. The
            ingress mostly awaits the tiers, so this is far above Ray Serve's
            default of 5, which would cap the tiers' batches at 5 requests and
            keep the rest waiting in the proxy.
    """

    max_ongoing_requests: int = 256


@dataclass
class ServeConfig:
    """`python -m moe.serve small=CKPT large=CKPT [host=...] [port=...]`."""

    small: str = MISSING
    large: str = MISSING
    host: str = "127.0.0.1"
    port: int = 8000
    address: Optional[str] = None  # None: a local Ray with its dashboard; "auto": join a cluster
    dashboard_port: int = 8265
    app_name: str = "cascade"
    tiers: TiersConfig = field(default_factory=TiersConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    ingress: IngressConfig = field(default_factory=IngressConfig)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_serve", node=ServeConfig)


def fail(key: str, message: str) -> None:
    """Raises the ValueError of an invalid serve config value, naming its key."""
    raise ValueError(f"invalid configuration: {key}: {message}")


def validate_serve_config(cfg: DictConfig) -> None:
    """Checks values the schema's types cannot; ValueError naming the key."""
    if not 1 <= cfg.port <= 65535:
        fail("port", f"must be a TCP port in 1..65535, got {cfg.port}")
    if not 1 <= cfg.dashboard_port <= 65535:
        fail("dashboard_port", f"must be a TCP port in 1..65535, got {cfg.dashboard_port}")
    for name in ("small", "large"):
        tier = cfg.tiers[name]
        key = f"tiers.{name}"
        if tier.num_replicas < 1:
            fail(f"{key}.num_replicas", f"must be >= 1, got {tier.num_replicas}")
        if tier.num_cpus <= 0 or tier.num_gpus < 0:
            fail(f"{key}.num_cpus", f"must be > 0 (and num_gpus >= 0), got {tier.num_cpus}, {tier.num_gpus}")
        if tier.max_batch_size < 1 or tier.batch_wait_timeout_s < 0:
            fail(f"{key}.max_batch_size", "must be >= 1 (and batch_wait_timeout_s >= 0)")
        if tier.dtype not in ("float32", "bfloat16"):
            fail(f"{key}.dtype", f"must be float32 or bfloat16, got {tier.dtype!r}")
        if tier.fault not in (None, "error", "hang"):
            fail(f"{key}.fault", f"must be null, error or hang, got {tier.fault!r}")
        scaling = tier.autoscaling
        if scaling.enabled and not 1 <= scaling.min_replicas <= scaling.max_replicas:
            fail(f"{key}.autoscaling", f"needs 1 <= min_replicas <= max_replicas, got {scaling.min_replicas}, "
                                        f"{scaling.max_replicas}")
    if cfg.ingress.max_ongoing_requests < 1:
        fail("ingress.max_ongoing_requests", f"must be >= 1, got {cfg.ingress.max_ongoing_requests}")
    r = cfg.routing
    if r.target_large_fraction is not None and not 0.0 <= r.target_large_fraction <= 1.0:
        fail("routing.target_large_fraction", f"must lie in [0, 1], got {r.target_large_fraction}")
    if r.threshold is not None and not 0.0 <= r.threshold <= 1.0:
        fail("routing.threshold", f"must lie in [0, 1] (a probability), got {r.threshold}")
    if r.cost_budget is not None and not 0.0 <= r.cost_budget <= 1.0:
        fail("routing.cost_budget", f"must lie in [0, 1] (a share of the all-large cost), got {r.cost_budget}")
    if r.posthoc_confidence is not None and not 0.0 <= r.posthoc_confidence <= 1.0:
        fail("routing.posthoc_confidence", f"must lie in [0, 1], got {r.posthoc_confidence}")
    for key in ("large_timeout_s", "max_tokens_limit", "max_prompt_chars", "max_body_bytes"):
        if r[key] <= 0:
            fail(f"routing.{key}", f"must be positive, got {r[key]}")
