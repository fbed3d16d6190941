"""Builds and runs the cascade application on Ray Serve: two tier deployments behind one ingress.

    python -m moe.serve small=runs/mixtral_tiny/checkpoints/step_00000300 \\
                        large=runs/mixtral_base/checkpoints/step_00000500 port=8000

Everything that can be checked is checked before Ray starts: the config
values, both checkpoints (readable, with a tokenizer), that the two tiers
share one tokenizer (the message names both files), and the router file.
`checked_app` does those checks and builds the application; `moe.serve`
deploys it here, and Ray Serve config files through `serving.deploy`.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from moe.files import TOKENIZER_NAME, file_sha256
from serving.config import INGRESS_CPUS, size_tiers, validate_serve_config


def check_tiers(small: str, large: Optional[str]) -> dict[str, Any]:
    """Both tiers are moe checkpoints with the same tokenizer; returns their facts (large None: the small's only).

    Raises:
        ValueError: naming the key (`small`/`large`) and the file at fault.
    """
    from moe.checkpoint import read_model_config
    from moe.model import count_parameters

    facts: dict[str, Any] = {}
    for key, path in (("small", small), ("large", large)):
        if path is None:
            continue
        directory = Path(path)
        if not directory.is_dir():
            raise ValueError(f"invalid configuration: {key}: {path} is not a directory (a checkpoint written by "
                             f"moe.train, e.g. runs/NAME/checkpoints/step_N)")
        try:
            config = read_model_config(directory)
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"invalid configuration: {key}: {err}") from None
        tokenizer = directory / TOKENIZER_NAME
        if not tokenizer.is_file():
            raise ValueError(f"invalid configuration: {key}: {tokenizer} is missing (checkpoints of moe.train carry "
                             f"their data's tokenizer)")
        facts[key] = {"checkpoint": str(directory.resolve()), "tokenizer": str(tokenizer.resolve()),
                      "tokenizer_sha256": file_sha256(tokenizer), "max_seq_len": config.max_seq_len,
                      "vocab_size": config.vocab_size, "active_params": count_parameters(config)["active"],
                      "num_layers": config.num_layers, "hidden_size": config.hidden_size}
    if large is not None and facts["small"]["tokenizer_sha256"] != facts["large"]["tokenizer_sha256"]:
        raise ValueError(f"invalid configuration: small/large: the tiers' tokenizers differ: "
                         f"{facts['small']['tokenizer']} and {facts['large']['tokenizer']}; a cascade needs both "
                         f"tiers trained on the same prepared data")
    return facts


def tier_facts(cfg: DictConfig) -> dict[str, Any]:
    """`check_tiers` of the two checkpoints; with an external large tier (`tiers.large.endpoint`), the small
    checkpoint's facts and the endpoint's: its context is taken as the small tier's (which answers for it
    when it fails), its cost per token is `routing.cost_ratio`'s."""
    large = cfg.tiers.large
    if large.endpoint is None:
        return check_tiers(cfg.small, cfg.large)
    facts = check_tiers(cfg.small, None)
    facts["large"] = {"endpoint": large.endpoint, "model": large.model,
                      "max_seq_len": facts["small"]["max_seq_len"], "active_params": None}
    return facts


def router_file_for(cfg: DictConfig, facts: dict[str, Any]) -> Path:
    """The router.json to serve with: the configured one, or a cached calibration of this pair (made if missing)."""
    from moe.difficulty import DifficultyRouter

    if cfg.routing.router is not None:
        path = Path(cfg.routing.router)
        try:
            router = DifficultyRouter.load(path)
            if router.hidden is not None:  # a probe reads the small tier's own hidden states
                router.hidden.check_model(SimpleNamespace(**facts["small"]), f"small ({facts['small']['checkpoint']})")
        except (OSError, ValueError) as err:
            raise ValueError(f"invalid configuration: routing.router: {err}") from None
        return path.resolve()
    large = facts["large"]
    large_key = large["checkpoint"] if "endpoint" not in large else f"{large['endpoint']}|{large['model']}"
    pair = hashlib.sha256(f"{facts['small']['checkpoint']}|{large_key}".encode()).hexdigest()[:12]
    out = Path(cfg.routing.calibration_root) / pair
    path = out / "router.json"
    if path.is_file():
        print(f"[moe.serve] router: {path} (cached calibration of this pair)", flush=True)
        return path.resolve()
    print(f"[moe.serve] no routing.router given: calibrating the pair into {out} (once; cached)", flush=True)
    from cascade.calibrate import calibrate

    if "endpoint" not in large:
        calibrate(small=facts["small"]["checkpoint"], large=large["checkpoint"], out=str(out))
        return path.resolve()
    try:  # the endpoint's own log-probabilities label the queries (cascade.endpoint)
        calibrate(small=facts["small"]["checkpoint"], large_endpoint=large["endpoint"], large_model=large["model"],
                  large_api_key_env=cfg.tiers.large.api_key_env, large_timeout_s=cfg.tiers.large.timeout_s,
                  out=str(out))
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"invalid configuration: routing.router: not given, and calibrating the small tier against "
                         f"the endpoint failed ({err}); pass a router.json of python -m cascade.calibrate "
                         f"(docs/serving.md, External tiers)") from None
    return path.resolve()


def build_app(cfg: DictConfig, facts: dict[str, Any], router_file: Path):
    """The Ray Serve application: `small` and `large` Tier deployments, composed into the ingress."""
    from ray import serve

    from moe.difficulty import DifficultyRouter
    from serving.endpoint import EndpointTier
    from serving.ingress import IngressDeployment
    from serving.tier import Tier

    router = DifficultyRouter.load(router_file)
    tiers = {}
    for name in ("small", "large"):
        t = cfg.tiers[name]
        options: dict[str, Any] = {"name": name, "ray_actor_options": {"num_cpus": t.num_cpus,
                                                                       "num_gpus": t.num_gpus,
                                                                       "resources": dict(t.resources)},
                                   "max_ongoing_requests": 4 * t.max_batch_size}
        if t.autoscaling.enabled:
            options["autoscaling_config"] = {"min_replicas": t.autoscaling.min_replicas,
                                             "max_replicas": t.autoscaling.max_replicas,
                                             "target_ongoing_requests": t.autoscaling.target_ongoing_requests}
        else:
            options["num_replicas"] = t.num_replicas
        if t.endpoint is not None:
            tiers[name] = serve.deployment(EndpointTier).options(**options).bind(
                name, t.endpoint, t.model, facts["small"]["tokenizer"], timeout_s=t.timeout_s,
                api_key_env=t.api_key_env, max_retries=t.max_retries)
            continue
        deployment = serve.deployment(Tier).options(**options)
        tiers[name] = deployment.bind(name, facts[name]["checkpoint"], dtype=t.dtype,
                                      num_threads=max(1, int(t.num_cpus)), max_batch_size=t.max_batch_size,
                                      compile_decode=t.compile_decode,
                                      batch_wait_timeout_s=t.batch_wait_timeout_s, fault=t.fault,
                                      hidden=router.hidden.to_dict() if name == "small" and router.hidden else None)
    ingress = serve.deployment(IngressDeployment).options(
        name="ingress", ray_actor_options={"num_cpus": INGRESS_CPUS},
        max_ongoing_requests=cfg.ingress.max_ongoing_requests)
    routing = OmegaConf.to_container(cfg.routing, resolve=True)
    cost_ratio = cfg.routing.cost_ratio
    if cost_ratio is None and facts["large"]["active_params"] is not None:
        cost_ratio = facts["small"]["active_params"] / facts["large"]["active_params"]
    return ingress.bind(tiers["small"], tiers["large"], str(router_file), facts["small"]["tokenizer"],
                        min(facts["small"]["max_seq_len"], facts["large"]["max_seq_len"]), routing, cost_ratio,
                        OmegaConf.to_container(cfg.chat, resolve=True))


def checked_app(cfg: DictConfig, resources: dict[str, float], *, check_fit: bool = True):
    """The application of a composed config, after every check that needs no Ray.

    Args:
        cfg: the composed serve config (unset tier CPUs are filled in from `resources`).
        resources: the total resources of the cluster it deploys on.
        check_fit: refuse replicas that do not fit `resources` (a local Ray; see `size_tiers`).

    Raises:
        ValueError: naming the key at fault (config values, resources, checkpoints, router file).
    """
    validate_serve_config(cfg)
    size_tiers(cfg, resources, check_fit=check_fit)
    facts = tier_facts(cfg)
    return build_app(cfg, facts, router_file_for(cfg, facts))


def local_resources() -> dict[str, float]:
    """What a local Ray started on this machine holds (ray.init's defaults)."""
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def checked_local_app(cfg: DictConfig) -> tuple[Any, dict[str, float]]:
    """`checked_app` on this machine's resources, and the ports a local start binds (the dashboard's, with no
    retry, and Serve's) checked free: everything refused before a local Ray starts. Returns the application
    and the resources."""
    from cluster.runtime import check_port_free

    resources = local_resources()
    app = checked_app(cfg, resources)
    check_port_free("127.0.0.1", cfg.dashboard_port, "dashboard_port")
    check_port_free(cfg.host, cfg.port, "port")
    return app, resources


def start(cfg: DictConfig, *, init_ray: bool = True) -> str:
    """Checks, starts Ray (unless running) and Serve, deploys the app; returns its URL."""
    import ray
    from ray import serve

    local = init_ray and not ray.is_initialized() and cfg.address is None
    if local:
        from cluster.runtime import init_local_ray, start_reaper

        app, resources = checked_local_app(cfg)
        init_local_ray(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=cfg.dashboard_port,
                       num_cpus=int(resources["CPU"]))
        start_reaper()
    else:
        if init_ray and not ray.is_initialized():
            ray.init(address=cfg.address)
        app = checked_app(cfg, ray.cluster_resources(), check_fit=cfg.address is None)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(app, name=cfg.app_name, route_prefix="/")
    return f"http://{cfg.host}:{cfg.port}"


def serve_forever(cfg: DictConfig) -> None:
    """`python -m moe.serve`: deploy, print the addresses, run until Ctrl-C, then shut Serve down."""
    import ray
    from ray import serve

    from cluster.runtime import dashboard_url

    url = start(cfg)
    print(f"[moe.serve] OpenAI-compatible API: {url}/v1/completions  (models: {url}/v1/models, health: "
          f"{url}/healthz, OpenAPI: {url}/openapi.json)", flush=True)
    print(f"[moe.serve] Ray dashboard: {dashboard_url()}  (Serve tab: deployments small, large, ingress)", flush=True)
    print("[moe.serve] running; Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\n[moe.serve] stopping", file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
