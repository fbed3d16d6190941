"""benchmarks/gpu_suite.py runs end to end on the CPU at a tiny size (the GPU figures need a GPU session;
this keeps the script from rotting between them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("extra", [["--no-compile"],
                                   pytest.param(["--recompute", "selective"], marks=pytest.mark.extended)])
def test_smoke_run_reports_the_training_step(extra: list[str]) -> None:
    result = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--device", "cpu", "--model", "mixtral_tiny",
                             "--vocab-size", "512", "--batch", "2", "--seq-len", "64", "--warmup", "1", "--steps", "2",
                             "--skip-layer", *extra], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    train = summary["train"]
    assert train["model"] == "mixtral_tiny" and train["tokens_per_s"] > 0 and train["tflops"] > 0
    assert train["compile"] == ("--no-compile" not in extra)
    assert train["activation_checkpointing"] == ("selective" if "selective" in extra else "none")
    assert train["mfu"] is None, "no MFU without a known GPU peak"
    assert 0 < train["loss"] < 10
    assert train["planned_peak_gib"] > 0


def test_cuda_without_a_gpu_is_refused() -> None:
    result = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--skip-layer"], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert result.returncode != 0 and "no CUDA device" in result.stderr


def test_gpu_scripts_import_with_torch_alone() -> None:
    """benchmarks/gpu_suite.py and moe.demo import on a machine with torch but none of safetensors, Ray, Hydra,
    wandb, DeepSpeed or omegaconf (the lent GPU machines have torch, not this project's dependencies)."""
    blocker = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('safetensors', 'ray', 'hydra', 'wandb', 'deepspeed', 'omegaconf'):\n"
        "            raise ImportError('not on the GPU machine: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.path.insert(0, 'benchmarks')\n"
        "import gpu_suite, moe.demo\n"
        "print('imported')\n")
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr[-2000:]


def test_gpu_check_smoke_run_on_the_cpu(tmp_path) -> None:
    """benchmarks/gpu_check.py, what the first session with a GPU runs, on the CPU: every check that the CPU can
    run passes (flex forward, bf16 grouped GEMM with an empty expert, rope dtypes, the compiled decoding step traced
    with aot_eager); the GPU-only parts say so."""
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--out",
                             str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["grouped_mm"]["empty_expert_grad_max"] == 0.0
    assert report["flex"]["forward_max_abs_diff"] < 1e-4 and "skipped" in report["flex"]["backward"]
    assert report["rope_dtypes"]["qkv_dtypes"] == ["torch.bfloat16"] * 3
    assert "needs 2 GPUs" in report["fsdp_parity"]["skipped"]
    decode = report["compiled_decode"]
    assert decode["ok"] and decode["greedy_tokens_agree"] and decode["graphs_compiled"] == 2


@pytest.mark.extended
def test_gpu_check_fsdp_parity_runs_on_two_cpu_processes(tmp_path) -> None:
    """The 2-GPU check of gpu_check.py (FSDP2 against the native engine at ep = world, issue 18 W1) on 2 gloo
    processes: the same losses, gradient norms and weights. On a GPU machine it runs on NCCL instead."""
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick",
                             "--parity-on-cpu", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    parity = json.loads(out.read_text())["fsdp_parity"]
    assert parity["ok"] and parity["world_size"] == 2 and parity["losses"][0] == parity["losses"][1]
    assert parity["max_expert_weight_diff"] < 1e-4
