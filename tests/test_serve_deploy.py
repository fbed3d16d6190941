"""`serving.deploy.app_builder`, Ray Serve's entry point in infra/serve_config.yaml, without Ray.

The builder must compose what `python -m moe.serve` composes for the same keys,
run its checks, and return the application whose deployments the config file's
overrides name; bad args fail naming the key. Deploying the file on a real
Serve is tests/test_serving.py's `test_serve_config_file_deploys_the_cascade`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("ray.serve")

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from ray._common.utils import import_attr  # noqa: E402  (what Serve resolves import_path with)
from ray.serve import Application  # noqa: E402
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary  # noqa: E402
from ray.serve._private.build_app import build_app  # noqa: E402

from serving.config import INGRESS_CPUS, register_configs, size_tiers  # noqa: E402
from serving.deploy import app_builder, compose_serve_config  # noqa: E402
from serving_helpers import make_tiers, serve_config_app  # noqa: E402
from train_helpers import ROOT  # noqa: E402

register_configs()


@pytest.fixture(scope="module")
def tiers(tmp_path_factory) -> dict[str, Path]:
    return make_tiers(tmp_path_factory.mktemp("serve_deploy"))


@pytest.fixture(scope="module")
def app(tiers) -> dict:
    return serve_config_app(tiers)


def test_import_path_resolves_to_the_builder(app) -> None:
    assert import_attr(app["import_path"]) is app_builder


def test_builder_composes_what_moe_serve_composes(app) -> None:
    """The file's args as `python -m moe.serve KEY=VALUE ...` would give them on the command line."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        expected = compose(config_name="serve", overrides=[f"{key}={'null' if value is None else value}"
                                                             for key, value in app["args"].items()])
    assert OmegaConf.to_container(compose_serve_config(app["args"])) == OmegaConf.to_container(expected)
    nested = compose_serve_config({"small": "a", "large": "b", "tiers": {"large": {"num_replicas": 3}},
                                   "routing": {"threshold": 0.25}})
    assert nested.tiers.large.num_replicas == 3 and nested.routing.threshold == 0.25
    from_cli = compose_serve_config({"small": "a", "large": "b", "tiers.small.num_replicas": "2"})  # serve run k=v
    assert from_cli.tiers.small.num_replicas == 2


def test_builder_returns_the_cascade_with_the_overridden_deployments(app) -> None:
    # As Serve's build task calls it: the args dict of the config file, checked against the signature.
    application = call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), app["args"])
    assert isinstance(application, Application)
    built = build_app(application, name=app["name"])
    assert {d.name for d in built.deployments} == {"small", "large", "ingress"}
    assert built.ingress_deployment_name == "ingress"
    assert {d["name"] for d in app["deployments"]} <= {d.name for d in built.deployments}
    # The ingress mostly awaits the tiers: Serve's default of 5 ongoing requests would cap the tiers' batches.
    ingress = next(d for d in built.deployments if d.name == "ingress")
    assert ingress.max_ongoing_requests == 256
    changed = build_app(app_builder({**app["args"], "ingress.max_ongoing_requests": 64}), name=app["name"])
    assert next(d for d in changed.deployments if d.name == "ingress").max_ongoing_requests == 64
    # tiers.X.compile_decode reaches the tier's constructor (which compiles its decoding steps at start).
    compiled = build_app(app_builder({**app["args"], "tiers.small.compile_decode": "true"}), name=app["name"])
    tier_kwargs = {d.name: d.init_kwargs for d in compiled.deployments if d.name in ("small", "large")}
    assert tier_kwargs["small"]["compile_decode"] is True and tier_kwargs["large"]["compile_decode"] is False


def test_config_overrides_only_scaling(app) -> None:
    # ray_actor_options in `deployments` would replace the code's: a tier's torch threads follow
    # tiers.X.num_cpus and its device tiers.X.num_gpus, both args.
    for override in app["deployments"]:
        assert set(override) <= {"name", "num_replicas", "autoscaling_config", "max_ongoing_requests"}, override


@pytest.mark.parametrize("change,key", [
    ({"routing.routr": "x"}, "routing.routr"),                       # misspelt: the message suggests routing.router
    ({"tiers": {"small": {"num_replicas": 0}}}, "tiers.small.num_replicas"),
    ({"tiers.large.num_replicas": "two"}, "tiers.large.num_replicas"),
    ({"tiers.small.dtype": "float16"}, "tiers.small.dtype"),
    ({"port": 9000}, "port"),                                         # http_options.port of the Serve config
    ({"app_name": "x"}, "app_name"),
    ({"large": None}, "large"),
    ({"large": "/nonexistent/checkpoint"}, "large"),
    ({"routing.router": "/nonexistent/router.json"}, "routing.router"),
    ({"ingress.max_ongoing_requests": 0}, "ingress.max_ongoing_requests"),
    ({"routing": {"router": "x"}}, "routing.router"),                 # also given dotted
])
def test_bad_args_name_the_key(app, change, key) -> None:
    with pytest.raises(ValueError, match=rf"^invalid configuration: {key}: ") as err:
        app_builder({**app["args"], **change})
    if key == "routing.routr":
        assert "did you mean routing.router" in str(err.value)
    if key == "port":
        assert "http_options.port" in str(err.value)


def test_foreign_tokenizer_is_refused_naming_both_files(app, tiers) -> None:
    with pytest.raises(ValueError, match="tokenizers differ") as err:
        app_builder({**app["args"], "large": str(tiers["foreign"])})
    assert str(tiers["foreign"] / "tokenizer.json") in str(err.value)


def test_args_must_be_a_mapping_with_both_checkpoints() -> None:
    with pytest.raises(ValueError, match="^invalid configuration: args: "):
        app_builder(["small=a"])
    with pytest.raises(ValueError, match="^invalid configuration: small: required"):
        app_builder({})
    with pytest.raises(ValueError, match="^invalid configuration: large: missing: .* or an OpenAI-compatible "
                                         "endpoint"):
        app_builder({"small": "a"})


ENDPOINT = {"large": None, "tiers.large.endpoint": "http://127.0.0.1:9/v1", "tiers.large.model": "big"}


@pytest.mark.parametrize("change,key,words", [
    ({"tiers.small.endpoint": "http://h/v1"}, "tiers.small.endpoint", "small tier must be a checkpoint"),
    ({"large": "/some/checkpoint"}, "tiers.large.endpoint", "not both"),
    ({"tiers.large.endpoint": "127.0.0.1:9/v1"}, "tiers.large.endpoint", "http(s) URL"),
    ({"tiers.large.model": None}, "tiers.large.model", "required"),
    ({"tiers.large.timeout_s": 0}, "tiers.large.timeout_s", "> 0"),
    ({"tiers.large.api_key_env": "MOE_TEST_KEY_THAT_IS_NOT_SET"}, "tiers.large.api_key_env", "is not set"),
    ({"tiers.large.dtype": "bfloat16"}, "tiers.large.dtype", "endpoint tier"),
    ({"routing.cost_budget": 0.5}, "routing.cost_ratio", "external large tier"),
    # Without a router the small tier is calibrated against the endpoint (here none answers, and the small
    # checkpoint is not in a training run that names its data): refused, naming the key, before deploying.
    ({"routing.router": None}, "routing.router", "calibrating the small tier against the endpoint failed"),
])
def test_endpoint_tier_refusals_name_the_key(app, change, key, words) -> None:
    with pytest.raises(ValueError, match=rf"^invalid configuration: {key}: ") as err:
        app_builder({**app["args"], **ENDPOINT, **change})
    assert words in str(err.value)
    with pytest.raises(ValueError, match=r"^invalid configuration: tiers.large.model: is for an endpoint tier"):
        app_builder({**app["args"], "tiers.large.model": "big"})


def test_endpoint_tier_is_built_in_place_of_the_large_checkpoint(app, monkeypatch) -> None:
    from serving.endpoint import EndpointTier

    monkeypatch.setenv("MOE_TEST_ENDPOINT_KEY", "secret")
    built = build_app(app_builder({**app["args"], **ENDPOINT, "tiers.large.api_key_env": "MOE_TEST_ENDPOINT_KEY",
                                   "routing.cost_ratio": 0.25}), name=app["name"])
    large = next(d for d in built.deployments if d.name == "large")
    assert large.func_or_class is EndpointTier
    assert large.ray_actor_options["num_cpus"] == 0.1  # it only waits on HTTP
    assert "secret" not in repr(large.init_args) + repr(large.init_kwargs)  # the variable's name travels, not the key
    assert large.init_kwargs["api_key_env"] == "MOE_TEST_ENDPOINT_KEY"


def test_tier_resources_pin_replicas_to_nodes(app) -> None:
    built = build_app(app_builder({**app["args"], "tiers.large.resources": {"pool_large": 1}}), name=app["name"])
    large = next(d for d in built.deployments if d.name == "large")
    assert large.ray_actor_options["resources"] == {"pool_large": 1}
    with pytest.raises(ValueError, match="^invalid configuration: tiers.small.resources: custom resources"):
        app_builder({**app["args"], "tiers.small.resources": {"GPU": 1}})


@pytest.mark.parametrize("cpus,expected", [(2, 0.95), (3, 1.0), (16, 1.0)])
def test_unset_tier_cpus_share_the_cluster(cpus: int, expected: float) -> None:
    cfg = compose_serve_config({"small": "a", "large": "b"})
    size_tiers(cfg, {"CPU": cpus})
    assert cfg.tiers.small.num_cpus == cfg.tiers.large.num_cpus == expected
    assert INGRESS_CPUS + 2 * expected <= cpus
    # Set tiers keep their CPUs; the unset one takes what is left, replicas counted.
    cfg = compose_serve_config({"small": "a", "large": "b", "tiers.small.num_cpus": 0.5,
                                "tiers.large.num_replicas": 2})
    size_tiers(cfg, {"CPU": 2})
    assert cfg.tiers.small.num_cpus == 0.5 and cfg.tiers.large.num_cpus == 0.7


@pytest.mark.parametrize("args,resources,key,numbers", [
    ({"tiers.small.num_cpus": 1, "tiers.large.num_cpus": 1}, {"CPU": 2}, "tiers.small.num_cpus", ("2.1", "has 2")),
    ({"tiers.small.num_cpus": 1, "tiers.large.num_cpus": 2, "tiers.large.num_replicas": 2}, {"CPU": 4},
     "tiers.large.num_cpus", ("5.1", "large 2 x 2", "has 4")),
    ({"tiers.small.num_cpus": 2}, {"CPU": 2}, "tiers.large.num_cpus", ("no CPU left",)),
    ({"tiers.large.num_gpus": 1}, {"CPU": 8, "GPU": 0}, "tiers.large.num_gpus", ("ask for 1 GPUs", "has 0")),
    ({"tiers.large.resources": {"pool_large": 1}}, {"CPU": 8}, "tiers.large.resources",
     ("ask for 1 pool_large", "has 0")),
])
def test_replicas_that_do_not_fit_are_refused_naming_the_key(args, resources, key, numbers) -> None:
    cfg = compose_serve_config({"small": "a", "large": "b", **args})
    with pytest.raises(ValueError, match=rf"^invalid configuration: {key}: ") as err:
        size_tiers(cfg, resources)
    for number in numbers:
        assert number in str(err.value), str(err.value)
    size_tiers(compose_serve_config({"small": "a", "large": "b", **args}), resources, check_fit=False)  # remote
