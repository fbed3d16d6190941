"""Hydra composition of every experiment, validation before Ray starts, and the infra/ files."""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cluster.config import model_config_from, register_configs, validate_train_config
from moe import count_parameters
from moe.model import training_flops_per_token

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))

register_configs()


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_expected_experiments_exist() -> None:
    assert {"mixtral_tiny", "mixtral_base", "mixtral_small", "dense_tiny"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_validates(experiment: str) -> None:
    cfg = compose_cfg([f"+experiment={experiment}"])
    validate_train_config(cfg)
    assert cfg.name == experiment
    for key in ("trainer.max_steps", "trainer.engine", "trainer.resume", "cluster.address", "cluster.num_workers",
                "cluster.use_gpu", "parallel.ep", "model.experts.backend", "logger.wandb.mode"):
        OmegaConf.select(cfg, key, throw_on_missing=True)
    assert cfg.logger.wandb.mode == "offline"


def test_preset_sizes() -> None:
    small = model_config_from(compose_cfg(["+experiment=mixtral_small"]), vocab_size=32768)
    counts = count_parameters(small)
    assert 1.3e9 < counts["total"] < 1.7e9 and 0.3e9 < counts["active"] < 0.5e9, counts
    assert (small.hidden_size, small.num_layers, small.num_heads, small.num_kv_heads) == (1024, 16, 16, 4)
    assert (small.experts.num_experts, small.experts.hidden_size, small.router.top_k) == (8, 3584, 2)

    tiny = model_config_from(compose_cfg(["+experiment=mixtral_tiny"]), vocab_size=8192)
    dense = model_config_from(compose_cfg(["+experiment=dense_tiny"]), vocab_size=8192)
    assert dense.num_moe_layers == 0 and tiny.num_moe_layers == tiny.num_layers
    # Equal active FLOPs per token: the dense FFN is as wide as top_k experts.
    tiny_counts, dense_counts = count_parameters(tiny), count_parameters(dense)
    router_params = tiny.num_layers * tiny.hidden_size * tiny.experts.num_experts
    assert tiny_counts["active"] - router_params == dense_counts["active"]

    # The cascade's large tier: same data (sequence length, tokenizer), several times the compute per token.
    base_cfg = compose_cfg(["+experiment=mixtral_base"])
    base = model_config_from(base_cfg, vocab_size=8192)
    assert base_cfg.data.seq_len == compose_cfg(["+experiment=mixtral_tiny"]).data.seq_len

    assert 3.0 < training_flops_per_token(base, 256) / training_flops_per_token(tiny, 256) < 6.0


@pytest.mark.parametrize("overrides,key", [
    (["parallel.ep=3", "cluster.num_workers=3", "trainer.global_batch_size=18"], "parallel.ep"),  # not a divisor of 8 experts
    (["parallel.ep=2", "cluster.num_workers=3"], "parallel.ep"),  # does not divide the workers
    (["trainer.engine=megatron"], "trainer.engine"),
    (["trainer.router_lr_scale=0"], "trainer.router_lr_scale"),
    (["trainer.max_steps=0"], "trainer.max_steps"),
    (["trainer.global_batch_size=15", "cluster.num_workers=2"], "trainer.global_batch_size"),
    (["model.num_heads=3"], "num_heads"),
    (["data.seq_len=512"], "data.seq_len"),
    (["+cluster.worker_resources.CPU=1"], "cluster.worker_resources.CPU"),
    (["+cluster.worker_resources.trainer_slot=0"], "cluster.worker_resources.trainer_slot"),
    (["trainer.loss_chunk_tokens=-1"], "trainer.loss_chunk_tokens"),
    (["trainer.loss_chunk_tokens=64", "trainer.distill.teacher=/some/teacher"], "trainer.loss_chunk_tokens"),
    (["model.experts.backend=megablocks"], "megablocks' grouped GEMM \\(gmm\\) runs in bfloat16 only"),  # issue 18, C6
    (["parallel.expert_load=0.5"], "parallel.expert_load"),  # issue 18, S8
    (["trainer.checkpoint_format=dcp"], "trainer.checkpoint_format"),
])
def test_invalid_config_names_the_key(overrides: list[str], key: str) -> None:
    cfg = compose_cfg(["+experiment=mixtral_tiny", *overrides])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate_train_config(cfg)


def test_worker_resources_are_checked_and_a_local_ray_refuses_them() -> None:
    """Custom resources per worker place workers on the nodes that offer them (benchmarks/drill_cluster.py);
    a local Ray offers none, so the workers would wait forever: refused, naming the key."""
    from cluster.launch import check_local_resources

    cfg = compose_cfg(["+experiment=mixtral_tiny", "+cluster.worker_resources.trainer_slot=1"])
    validate_train_config(cfg)
    assert dict(cfg.cluster.worker_resources) == {"trainer_slot": 1}
    with pytest.raises(ValueError, match=r"cluster\.worker_resources\.trainer_slot: the local Ray offers no"):
        check_local_resources(cfg, {"CPU": 2.0, "GPU": 0.0})
    check_local_resources(cfg, {"CPU": 2.0, "GPU": 0.0, "trainer_slot": 2.0})


def test_typo_fails_at_composition() -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="max_stepz"):
        compose_cfg(["+experiment=mixtral_tiny", "trainer.max_stepz=3"])


@pytest.mark.parametrize("overrides,key", [
    (["parallel.ep=3"], "parallel.ep"),
    (["cluster.num_workers=2", "cluster.num_cpus=2", "cluster.cpus_per_worker=2"], "cluster.cpus_per_worker"),
])
def test_bad_config_fails_before_ray_starts(tmp_path, overrides: list[str], key: str) -> None:
    """The real entry point exits with the key named, and never starts Ray. The config's error is named even
    when the dashboard port is taken too (another local run's, as in the test suite itself): the port is the
    last check."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = subprocess.run([sys.executable, "-m", "moe.train", "+experiment=mixtral_tiny", *overrides,
                               f"trainer.run_root={tmp_path}", "data.output=/nonexistent/never-prepared",
                               f"cluster.dashboard_port={taken.getsockname()[1]}"],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 1
    assert key in proc.stderr, proc.stderr
    assert "Ray dashboard" not in proc.stdout and not (tmp_path / "mixtral_tiny").exists()


def test_config_checks_import_no_torch() -> None:
    """The schemas and the checks that command lines run first load without torch, so a bad value or a
    dangerous data.output is refused in well under a second (torch alone takes 1.5 s to import here)."""
    code = ("import sys; import cluster.config, data_pipeline.prepare, serving.config, moe; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_infra_yaml_parses_and_entrypoint_composes() -> None:
    cluster = yaml.safe_load((ROOT / "infra" / "ray-cluster.yaml").read_text())
    assert cluster["head_node_type"] in cluster["available_node_types"]
    job = yaml.safe_load((ROOT / "infra" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"].startswith("ray.io/")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "moe.train"]
    cfg = compose_cfg(argv[3:])
    validate_train_config(cfg)
    assert cfg.name == "mixtral_small" and cfg.cluster.address == "auto" and cfg.cluster.use_gpu
    assert cfg.model.attention_backend == "flex", "GPU training masks documents with FlexAttention"
    proc = subprocess.run([sys.executable, "-m", "moe.train", *argv[3:], "--cfg", "job"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["trainer"]["run_root"] == "/mnt/shared/runs"
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    assert "pip install" in dockerfile and "moe.train" in dockerfile


def test_mfu_uses_the_workers_device_not_the_drivers() -> None:
    """Issue 18, K2: the driver (here without a GPU, like a KubeRay head) computes MFU from the device the
    workers name in status.json; a CPU run names none and reports null."""
    from cluster.launch import _mfu

    status = {"flops_per_token": 6e9, "world_size": 8, "device_name": "NVIDIA H100 80GB HBM3"}
    assert _mfu(1e5, status) == pytest.approx(1e5 * 6e9 / (989.0e12 * 8))
    assert _mfu(1e5, {**status, "device_name": None}) is None
    assert _mfu(1e5, {**status, "device_name": "a device of no known peak"}) is None


def test_gpu_workers_get_expandable_segments(monkeypatch, tmp_path) -> None:
    """Issue 18, S8: GPU workers run PyTorch's allocator with expandable segments, or the driver's own
    PYTORCH_CUDA_ALLOC_CONF; CPU workers get nothing. Ray Train's trainer carries it to every worker (constructed
    here, not run: no GPU on this machine)."""
    from cluster.launch import ALLOC_CONF, _ray_trainer, worker_env_vars

    gpu = compose_cfg(["+experiment=mixtral_small"])
    monkeypatch.delenv(ALLOC_CONF, raising=False)
    assert worker_env_vars(gpu) == {ALLOC_CONF: "expandable_segments:True"}
    assert worker_env_vars(compose_cfg(["+experiment=mixtral_tiny"])) == {}
    trainer = _ray_trainer(gpu, worker_config=None, run_dir=tmp_path)
    assert trainer.run_config.worker_runtime_env == {"env_vars": {ALLOC_CONF: "expandable_segments:True"}}
    monkeypatch.setenv(ALLOC_CONF, "max_split_size_mb:128")
    assert worker_env_vars(gpu) == {ALLOC_CONF: "max_split_size_mb:128"}


def test_the_plan_sizes_mixtral_small_for_its_measured_expert_load() -> None:
    """mixtral_small plans for 2.5x the mean expert load on the hottest rank (parallel.expert_load); null plans
    for the 4x routing can reach, and both fit its 80 GiB."""
    from cluster.config import memory_plan

    cfg = compose_cfg(["+experiment=mixtral_small"])
    model = model_config_from(cfg, vocab_size=cfg.data.vocab_size)
    preset = memory_plan(cfg, model)
    cfg.parallel.expert_load = None
    worst = memory_plan(cfg, model)
    assert preset.expert_load == 2.5 and worst.expert_load == 4.0
    assert preset.peak < worst.peak < 80 * 1024 ** 3
