"""The cascade as a Ray Serve application builder, for Serve config files and KubeRay.

    serve run infra/serve_config.yaml            # or: serve deploy infra/serve_config.yaml

The config file names `import_path: serving.deploy:app_builder`; Ray Serve
imports it and calls it with the application's `args`. Those are the keys of
`python -m moe.serve` (conf/serve.yaml, schema in `serving/config.py`), either
dotted (`routing.router: PATH`) or nested (`routing: {router: PATH}`). They are
composed onto conf/serve.yaml as moe.serve composes its command line, checked
by the same `serving.app.checked_app` and built by the same `build_app`, so a
config file deploys exactly what `python -m moe.serve` deploys.

The keys about where and how the server runs (`host`, `port`, `address`,
`dashboard_port`, `app_name`) belong to the Serve config file itself
(`http_options`, the application's `name`, `serve deploy --address`) and are
refused in `args`, naming the field to use instead.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from serving.config import fail, register_configs

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# moe.serve keys that a Serve config file sets elsewhere, and where.
SET_BY_SERVE_CONFIG = {
    "host": "http_options.host of the Serve config",
    "port": "http_options.port of the Serve config",
    "address": "the cluster: `serve run` joins RAY_ADDRESS or starts a local Ray, `serve deploy --address` names one",
    "dashboard_port": "the cluster (`ray start --dashboard-port`)",
    "app_name": "the application's `name` in the Serve config",
}


def _leaves(args: Mapping[Any, Any], prefix: str = "", mappings: frozenset = frozenset()) -> list[tuple[str, Any]]:
    """(dotted key, value) for every leaf: `{"routing": {"router": p}}` and `{"routing.router": p}` alike. Keys
    in `mappings` (fields whose value is a mapping, such as tiers.large.resources) are leaves."""
    leaves = []
    for key, value in args.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and dotted not in mappings:
            leaves += _leaves(value, prefix=f"{dotted}.", mappings=mappings)
        else:
            leaves.append((dotted, value))
    return leaves


def _leaf_keys(cfg: DictConfig) -> list[str]:
    container = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    return [key for key, _ in _leaves(container)]


def compose_serve_config(args: Mapping[str, Any]) -> DictConfig:
    """conf/serve.yaml with `args` applied, as `python -m moe.serve KEY=VALUE ...` composes it.

    Values keep their YAML types; strings are converted to the schema's types as
    on the command line ("2" to an int field is 2).

    Args:
        args: moe.serve keys, dotted or nested, to their values.

    Returns:
        The composed config (struct mode: no key can be added later).

    Raises:
        ValueError: naming the key: unknown (with the closest known key), of the
            wrong type, set by the Serve config instead, given twice, or required.
    """
    from hydra import compose, initialize_config_dir

    if not isinstance(args, Mapping):
        fail("args", f"must be a mapping of moe.serve keys to values (e.g. small: CKPT), got {type(args).__name__}")
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="serve")
    known = _leaf_keys(cfg)
    mappings = frozenset(key for key in known if isinstance(OmegaConf.select(cfg, key), DictConfig))
    seen: set[str] = set()
    for key, value in _leaves(args, mappings=mappings):
        top = key.split(".")[0]
        if top in SET_BY_SERVE_CONFIG:
            fail(key, f"not an application argument under Ray Serve; set by {SET_BY_SERVE_CONFIG[top]}")
        if key in seen:
            fail(key, "given twice (once dotted, once nested)")
        seen.add(key)
        try:
            if key in mappings:  # a mapping field (resources) takes new keys
                with open_dict(cfg):
                    OmegaConf.update(cfg, key, value, merge=True)
            else:
                OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as err:
            reason = str(err).splitlines()[0]
            parent = next((k for k in known if key.startswith(f"{k}.")), None)
            close = difflib.get_close_matches(key, known, n=1)
            if parent is not None:
                reason = f"{parent} is a single value, it has no keys"
            elif key not in known and close:
                reason += f"; did you mean {close[0]}?"
            fail(key, reason)
    missing = [key for key in known if key in OmegaConf.missing_keys(cfg)]
    if missing:
        fail("/".join(missing), "required: a checkpoint directory written by moe.train (runs/NAME/checkpoints/step_N)")
    return cfg


def app_builder(args: dict[str, Any]):
    """Ray Serve's entry point (`import_path: serving.deploy:app_builder`): the cascade application.

    Args:
        args: the application's `args` from the Serve config (see `compose_serve_config`).

    Returns:
        The `serve.Application` that `python -m moe.serve` deploys for the same keys:
        deployments `small`, `large` and the ingress `ingress`.

    Raises:
        ValueError: naming the key at fault, before any deployment starts.
    """
    import ray

    from serving.app import checked_app, local_resources

    # Serve's build task runs on the cluster it deploys to. Unset tier CPUs are sized from its resources; a fit
    # is not enforced there, since an autoscaling cluster (KubeRay) adds the nodes its replicas ask for.
    return checked_app(compose_serve_config(args), ray.cluster_resources() if ray.is_initialized() else
                       local_resources(), check_fit=False)
