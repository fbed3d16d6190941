"""Structured configs of `python -m moe.serve`, registered with Hydra's ConfigStore.

conf/serve.yaml extends `base_serve`, so a misspelt key fails at composition;
`validate_serve_config` checks values and names the key, before Ray starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING, DictConfig

from serving.chat import DEFAULT_STOP, DEFAULT_TEMPLATE


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
        num_cpus / num_gpus: Ray resources of each replica (torch uses num_cpus threads). num_cpus null:
            the cluster's CPUs shared among the replicas that start, at most 1 each (`size_tiers`).
        max_batch_size / batch_wait_timeout_s: `@serve.batch` of generation and prefill.
        dtype: float32 or bfloat16 weights.
        compile_decode: decode with `moe.generate.Generator(compile_decode=True)`, each decoding step one
            compiled graph (on this project's CPU 1.5-2x the tokens/s of the eager step at batch 1:
            docs/results/generate_peer.md). Each replica compiles its two graphs (one row, 2+ rows) before it
            takes requests: tens of seconds more at its start.
        fault: drills only: "error" makes every call fail, "hang" makes it never answer, "slow_start"
            delays its start by 15 s (a large checkpoint loading).
        resources: custom Ray resources each replica asks for (e.g. {node_pool_large: 1}), which pins
            the tier to the nodes that offer them (`ray start --resources`).
        endpoint: an OpenAI-compatible API's base URL (http://HOST:PORT/v1) that answers for this tier
            instead of a checkpoint (large tier only: serving/endpoint.py); its replicas only wait on HTTP
            and reserve ENDPOINT_CPUS unless num_cpus is set.
        model: the endpoint's model name.
        timeout_s: one request to the endpoint.
        api_key_env: the environment variable that holds the endpoint's API key (never the key itself).
        max_retries: retries of an endpoint request that could not connect (doubling back-off).
    """

    num_replicas: int = 1
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    num_cpus: Optional[float] = None
    num_gpus: float = 0.0
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    dtype: str = "float32"
    compile_decode: bool = False
    fault: Optional[str] = None
    resources: dict[str, float] = field(default_factory=dict)
    endpoint: Optional[str] = None
    model: Optional[str] = None
    timeout_s: float = 60.0
    api_key_env: Optional[str] = None
    max_retries: int = 2


@dataclass
class TiersConfig:
    small: TierConfig = field(default_factory=TierConfig)
    large: TierConfig = field(default_factory=TierConfig)


@dataclass
class RoutingConfig:
    """How the cascade routes, and the request limits the ingress enforces.

    Attributes:
        router: router.json written by `python -m cascade.calibrate`; null: calibrate
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
        breaker_cooldown_s: after a tier fails or times out, its requests go straight to the other tier
            (degraded) for this long, then one request probes it; 0: every request tries it.
        max_tokens_limit: the largest `max_tokens` a request may ask for.
        max_prompt_chars: longer prompts are refused before tokenizing.
        max_body_bytes: larger request bodies are refused (413).
        cost_ratio: the small tier's cost per token over the large tier's, for `cost_budget` and `budget=`;
            null: the ratio of their active parameters (an external large tier has none: set it).
    """

    router: Optional[str] = None
    calibration_root: str = "runs/cascade"
    target_large_fraction: Optional[float] = None
    threshold: Optional[float] = None
    cost_budget: Optional[float] = None
    posthoc_confidence: Optional[float] = None
    large_timeout_s: float = 60.0
    breaker_cooldown_s: float = 5.0
    max_tokens_limit: int = 256
    max_prompt_chars: int = 20000
    max_body_bytes: int = 1 << 20
    cost_ratio: Optional[float] = None


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
class ChatConfig:
    """POST /v1/chat/completions (serving/chat.py).

    Attributes:
        template: the Jinja2 chat template that renders the messages into one
            prompt (Hugging Face's variables); the default writes plain
            "Role: text" turns, for base models.
        stop: stop strings added to every chat request's own, where a base
            model would start the next turn.
    """

    template: str = DEFAULT_TEMPLATE
    stop: list[str] = field(default_factory=lambda: list(DEFAULT_STOP))


@dataclass
class ServeConfig:
    """`python -m moe.serve small=CKPT large=CKPT [host=...] [port=...]`, or the large tier an endpoint:
    `large=` unset and `tiers.large.endpoint=URL tiers.large.model=NAME`."""

    small: str = MISSING
    large: Optional[str] = None  # a checkpoint; or tiers.large.endpoint
    host: str = "127.0.0.1"
    port: int = 8000
    address: Optional[str] = None  # None: a local Ray with its dashboard; "auto": join a cluster
    dashboard_port: int = 8265
    app_name: str = "cascade"
    tiers: TiersConfig = field(default_factory=TiersConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    ingress: IngressConfig = field(default_factory=IngressConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)


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
        if (tier.num_cpus is not None and tier.num_cpus <= 0) or tier.num_gpus < 0:
            fail(f"{key}.num_cpus", f"must be > 0 (and num_gpus >= 0), got {tier.num_cpus}, {tier.num_gpus}")
        if tier.max_batch_size < 1 or tier.batch_wait_timeout_s < 0:
            fail(f"{key}.max_batch_size", "must be >= 1 (and batch_wait_timeout_s >= 0)")
        if tier.dtype not in ("float32", "bfloat16"):
            fail(f"{key}.dtype", f"must be float32 or bfloat16, got {tier.dtype!r}")
        if tier.fault not in (None, "error", "hang", "slow_start"):
            fail(f"{key}.fault", f"must be null, error, hang or slow_start, got {tier.fault!r}")
        _check_endpoint(cfg, name)
        for resource, amount in tier.resources.items():
            if resource in ("CPU", "GPU", "memory") or not amount > 0:
                fail(f"{key}.resources", f"custom resources with positive amounts only (CPU and GPU are "
                                         f"num_cpus/num_gpus), got {resource}: {amount}")
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
    if r.breaker_cooldown_s < 0:
        fail("routing.breaker_cooldown_s", f"must be >= 0, got {r.breaker_cooldown_s}")
    if r.cost_ratio is not None and not 0.0 < r.cost_ratio <= 1.0:
        fail("routing.cost_ratio", f"must lie in (0, 1] (the small tier's cost over the large's), got {r.cost_ratio}")
    if r.cost_budget is not None and cfg.tiers.large.endpoint is not None and r.cost_ratio is None:
        fail("routing.cost_ratio", "routing.cost_budget with an external large tier needs the tiers' cost ratio")
    from serving.chat import ChatTemplate, TemplateError

    try:
        ChatTemplate(cfg.chat.template, eos_token="").render([{"role": "user", "content": "hello"}])
    except TemplateError as err:
        fail("chat.template", str(err))
    if len(cfg.chat.stop) > 4 or not all(isinstance(s, str) and s for s in cfg.chat.stop):
        fail("chat.stop", f"must be at most 4 non-empty strings, got {list(cfg.chat.stop)}")


def _check_endpoint(cfg: DictConfig, name: str) -> None:
    """A tier is a checkpoint (`small=`/`large=`) or, the large one only, an endpoint; never both or neither."""
    tier, checkpoint = cfg.tiers[name], cfg.get(name)
    key = f"tiers.{name}"
    if tier.endpoint is None:
        if checkpoint is None:
            fail(name, f"missing: give the {name} tier's checkpoint ({name}=runs/NAME/checkpoints/step_N)"
                       + (" or an OpenAI-compatible endpoint (tiers.large.endpoint=URL tiers.large.model=NAME)"
                          if name == "large" else ""))
        for field_name in ("model", "api_key_env"):
            if tier[field_name] is not None:
                fail(f"{key}.{field_name}", f"is for an endpoint tier; {key}.endpoint is not set")
        return
    if name == "small":
        fail(f"{key}.endpoint", "the small tier must be a checkpoint: the router scores each prompt with the small "
                                "tier's own prefill (signals an external endpoint cannot give)")
    if checkpoint is not None:
        fail(f"{key}.endpoint", f"the {name} tier is either a checkpoint ({name}={checkpoint}) or an endpoint, "
                                f"not both")
    if not str(tier.endpoint).startswith(("http://", "https://")):
        fail(f"{key}.endpoint", f"must be an http(s) URL of an OpenAI-compatible API (http://HOST:PORT/v1), got "
                                f"{tier.endpoint!r}")
    if not tier.model:
        fail(f"{key}.model", f"the model name that {tier.endpoint} serves is required with an endpoint")
    if tier.timeout_s <= 0 or tier.max_retries < 0:
        fail(f"{key}.timeout_s", f"must be > 0 (and max_retries >= 0), got {tier.timeout_s}, {tier.max_retries}")
    if tier.api_key_env is not None and not os.environ.get(tier.api_key_env):
        fail(f"{key}.api_key_env", f"the environment variable {tier.api_key_env} is not set (it holds the "
                                   f"endpoint's API key; the key itself never goes in a config)")
    for field_name, default in (("fault", None), ("dtype", "float32"), ("num_gpus", 0.0)):
        if tier[field_name] != default:
            fail(f"{key}.{field_name}", "does not apply to an endpoint tier")


INGRESS_CPUS = 0.1  # the ingress deployment's reservation (serving.app.build_app)
ENDPOINT_CPUS = 0.1  # an endpoint tier's replica only waits on HTTP
TIER_NAMES = ("small", "large")


def starting_replicas(tier: DictConfig) -> int:
    """Replicas a tier starts with (the fixed count, or autoscaling's minimum)."""
    return tier.autoscaling.min_replicas if tier.autoscaling.enabled else tier.num_replicas


def size_tiers(cfg: DictConfig, resources: dict[str, float], *, check_fit: bool = True) -> None:
    """Fills the tiers' unset `num_cpus` from the cluster and checks that every replica that starts fits.

    On a local Ray a replica that cannot be placed waits forever while Serve only
    logs it, so a request the cluster cannot hold is refused here, before anything
    is deployed. Unset tiers share the CPUs that the ingress and the set tiers
    leave, at most 1 CPU a replica (0.95 each on a 2-CPU machine).

    Args:
        cfg: the composed serve config; its unset `tiers.*.num_cpus` are filled in.
        resources: the cluster's total resources (`ray.cluster_resources()`, or what a local Ray will hold).
        check_fit: refuse what does not fit; off for a remote cluster, whose autoscaler may add the nodes.

    Raises:
        ValueError: naming `tiers.<name>.num_cpus` or `num_gpus`, what was asked and what the cluster has.
    """
    cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
    replicas = {name: starting_replicas(cfg.tiers[name]) for name in TIER_NAMES}
    for name in TIER_NAMES:
        if cfg.tiers[name].endpoint is not None and cfg.tiers[name].num_cpus is None:
            cfg.tiers[name].num_cpus = ENDPOINT_CPUS
    unset = [name for name in TIER_NAMES if cfg.tiers[name].num_cpus is None]
    fixed = INGRESS_CPUS + sum(replicas[n] * cfg.tiers[n].num_cpus for n in TIER_NAMES if n not in unset)
    if unset:
        share = min(1.0, math.floor(100 * (cpus - fixed) / sum(replicas[n] for n in unset)) / 100)
        if share <= 0:
            if check_fit:
                fail(f"tiers.{unset[0]}.num_cpus", f"no CPU left for its replicas: the cluster has {cpus:g} CPUs "
                                                   f"and the ingress and the other tier take {fixed:g}")
            share = 1.0  # a cluster without free CPUs yet (a 0-CPU head): its autoscaler adds them
        for name in unset:
            cfg.tiers[name].num_cpus = share
    if not check_fit:
        return
    asked = {n: replicas[n] * cfg.tiers[n].num_cpus for n in TIER_NAMES}
    if INGRESS_CPUS + sum(asked.values()) > cpus + 1e-9:
        largest = max(TIER_NAMES, key=asked.get)
        parts = ", ".join(f"{n} {replicas[n]} x {cfg.tiers[n].num_cpus:g}" for n in TIER_NAMES)
        fail(f"tiers.{largest}.num_cpus", f"the replicas ask for {INGRESS_CPUS + sum(asked.values()):g} CPUs "
                                          f"({parts}, ingress {INGRESS_CPUS:g}) and the Ray cluster has {cpus:g}; "
                                          f"lower it, or leave tiers.*.num_cpus unset to share the cluster's CPUs")
    for name in TIER_NAMES:
        for resource, amount in cfg.tiers[name].resources.items():
            if replicas[name] * amount > float(resources.get(resource, 0.0)) + 1e-9:
                fail(f"tiers.{name}.resources", f"the replicas ask for {replicas[name] * amount:g} {resource} and "
                                                f"the Ray cluster has {float(resources.get(resource, 0.0)):g}")
    asked_gpus = {n: replicas[n] * cfg.tiers[n].num_gpus for n in TIER_NAMES}
    if sum(asked_gpus.values()) > gpus + 1e-9:
        largest = max(TIER_NAMES, key=asked_gpus.get)
        fail(f"tiers.{largest}.num_gpus", f"the replicas ask for {sum(asked_gpus.values()):g} GPUs and the Ray "
                                          f"cluster has {gpus:g}")
