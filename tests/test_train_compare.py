"""benchmarks/train_compare.py: its statistics on made-up runs, and one real two-run suite end to end."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import DEBUG_OVERRIDES, write_corpus

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("train_compare", ROOT / "benchmarks" / "train_compare.py")
tc = importlib.util.module_from_spec(spec)
sys.modules["train_compare"] = tc  # its dataclasses look their module up
spec.loader.exec_module(tc)


def row(variant: str, seed: int, steps: int, curve: list[tuple[int, float]],
        batches: list[float] | None = None) -> dict:
    return {"variant": variant, "seed": seed, "steps": steps, "val_loss": curve[-1][1], "curve": curve,
            "val_loss_stderr": 0.01, "tokens_per_s": 1000.0, "val_batch_losses": batches}


def test_first_step_reaching_interpolates_between_evaluations() -> None:
    curve = [(100, 6.0), (200, 5.0), (300, 4.5)]
    assert tc.first_step_reaching(curve, 5.0) == 200.0
    assert tc.first_step_reaching(curve, 5.5) == pytest.approx(150.0)
    assert tc.first_step_reaching(curve, 4.75) == pytest.approx(250.0)
    assert tc.first_step_reaching(curve, 7.0) == 100.0, "already below at the first evaluation"
    assert tc.first_step_reaching(curve, 4.0) is None


def test_compare_reports_paired_gaps_margins_and_reach() -> None:
    rows = []
    for seed, (moe_final, dense_final) in enumerate([(4.50, 4.60), (4.52, 4.61), (4.49, 4.62)]):
        rows.append(row("moe", seed, 300, [(150, 5.0), (300, moe_final)], [1.0, 2.0, 3.5]))
        rows.append(row("dense", seed, 300, [(150, 5.1), (300, dense_final)], [1.5, 2.0, 3.0]))
    rows.append(row("moe", 0, 600, [(300, 4.4), (600, 4.2)]))  # one seed: no spread, no verdict
    rows.append(row("dense", 0, 600, [(300, 4.5), (600, 4.3)]))
    short, long = tc.compare(rows, "moe", "dense")
    gaps = [-0.10, -0.09, -0.13]
    assert short["gap"] == pytest.approx(statistics.fmean(gaps))
    assert short["paired_gap_std"] == pytest.approx(statistics.stdev(gaps))
    seed_std = max(statistics.stdev([4.50, 4.52, 4.49]), statistics.stdev([4.60, 4.61, 4.62]))
    assert short["gap_in_seed_stds"] == pytest.approx(-statistics.fmean(gaps) / seed_std)
    assert short["wins_by_2_std"] is True
    assert short["gap_validation_stderr"] == pytest.approx(statistics.stdev([-0.5, 0.0, 0.5]) / 3 ** 0.5)
    # The MoE's mean curve (5.0 at 150, 4.503 at 300) crosses the dense final mean (4.61) in between.
    moe_300 = statistics.fmean([4.50, 4.52, 4.49])
    expected = 150 + 150 * (5.0 - 4.61) / (5.0 - moe_300)
    assert short["reaches_baseline_final_at_step"] == pytest.approx(expected)
    assert short["reaches_baseline_final_fraction"] == pytest.approx(expected / 300)
    assert long["seeds"] == 1 and long["wins_by_2_std"] is False
    assert long["gap_validation_stderr"] != long["gap_validation_stderr"], "nan without per-batch losses"


def test_specs_pair_every_seed_and_share_the_data_order() -> None:
    specs = tc.quality_specs([300, 600], seeds=2, variants=tc.DEFAULT_VARIANTS)
    assert [s.name for s in specs[:3]] == ["moe_s300_seed0", "dense_s300_seed0", "moe_fixed_root_s300_seed0"]
    assert len(specs) == 12 and len({s.name for s in specs}) == 12
    args = tc.parser().parse_args(["quality", "--run-root", "/tmp/x"])
    for spec in specs:
        argv = tc.command(spec, args)
        assert f"trainer.seed={spec.seed}" in argv and f"data.seed={spec.seed}" in argv
        assert f"trainer.max_steps={spec.steps}" in argv
    sweep = tc.sweep_specs([300], seeds=1, lrs=[1e-3, 2e-3])
    assert [s.name for s in sweep] == ["moe_lr0.001_s300_seed0", "dense_lr0.001_s300_seed0",
                                       "moe_lr0.002_s300_seed0", "dense_lr0.002_s300_seed0"]


def test_every_moe_variant_and_its_dense_baseline_have_equal_active_flops() -> None:
    from omegaconf import OmegaConf

    from cluster.config import model_config_from
    from moe.model import training_flops_per_token

    def flops(variant: str) -> tuple[float, int]:
        experiment, overrides, _ = tc.VARIANTS[variant]
        cfg = OmegaConf.create(tc.composed_config([f"+experiment={experiment}", *overrides(300)]))
        config = model_config_from(cfg, vocab_size=8192)
        return training_flops_per_token(config, 256), config.hidden_size

    pairs = tc.compared_pairs(list(tc.VARIANTS))
    assert ("moe_d64", "dense_d64") in pairs and ("moe_d32", "dense_d32") in pairs
    for variant, baseline in pairs:
        if baseline.startswith("dense"):
            (moe_flops, moe_width), (dense_flops, dense_width) = flops(variant), flops(baseline)
            assert moe_width == dense_width and moe_flops == pytest.approx(dense_flops, rel=0.01), variant
    assert flops("dense_d32")[0] < flops("dense_d64")[0] < flops("dense")[0] / 2
    sweep = tc.sweep_specs([300], seeds=1, lrs=[1e-3], variants=("moe_d64", "dense_d64"))
    assert [s.name for s in sweep] == ["moe_d64_lr0.001_s300_seed0", "dense_d64_lr0.001_s300_seed0"]
    assert "model.hidden_size=64" in sweep[1].overrides and "trainer.lr=0.001" in sweep[1].overrides


@pytest.mark.parametrize("argv,message", [(["--seeds", "0"], "--seeds"), (["--steps", "0"], "--steps"),
                                          (["--lrs", "-1"], "--lrs"), (["--validation-fraction", "1"],
                                                                       "--validation-fraction")])
def test_bad_arguments_are_refused_by_name(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        tc.check_args(tc.parser().parse_args(["quality", *argv]))


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.timeout(600)
@pytest.mark.own_ray
def test_suite_trains_reuses_and_refuses_other_settings(tmp_path) -> None:
    """Two real `python -m moe.train` runs (MoE and dense, 2 steps each) on a small corpus; the same command
    again reuses them without training; other settings in the same run root are refused."""
    write_corpus(tmp_path / "text")
    own = ("data.validation_fraction=", "trainer.eval_batches=")  # the suite sets these itself
    overrides = [o for o in DEBUG_OVERRIDES if not o.startswith(own)]
    base = [sys.executable, "benchmarks/train_compare.py", "quality", "--seeds", "1", "--steps", "2",
            "--variants", "moe", "dense", "--eval-batches", "2", "--eval-points", "2", "--validation-fraction", "0.1",
            "--run-root", str(tmp_path / "bench"), "--override", f"data.sources=[{tmp_path / 'text'}]", *overrides]
    first = subprocess.run(base, capture_output=True, text=True, cwd=ROOT, timeout=400)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    result = json.loads(first.stdout.strip().splitlines()[-1])
    assert {r["variant"] for r in result["rows"]} == {"moe", "dense"}
    assert all(r["curve"][-1][0] == 2 and r["val_loss"] > 0 and len(r["val_batch_losses"]) == 2
               for r in result["rows"])
    (comparison,) = result["comparisons"]
    assert comparison["steps"] == 2 and comparison["seeds"] == 1
    assert (tmp_path / "bench" / "quality_curves_2_moe_dense.png").is_file()

    again = subprocess.run(base, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert again.returncode == 0 and again.stdout.count("reusing the finished run") == 2
    assert json.loads(again.stdout.strip().splitlines()[-1])["rows"] == result["rows"]

    other = subprocess.run([*base, "trainer.weight_decay=0.05"], capture_output=True, text=True, cwd=ROOT,
                           timeout=120)
    assert other.returncode != 0 and "trained with other settings" in other.stderr

    # A run trained before a default changed (its stored config says otherwise) is not reused; a key the
    # stored config lacks (added to the schema later) counts as its base default (dense_tiny: 1.0, as the base).
    dense = tmp_path / "bench" / "dense_s2_seed0" / "config.yaml"
    text = dense.read_text()
    assert "  router_lr_scale: 1.0\n" in text
    dense.write_text(text.replace("  router_lr_scale: 1.0\n", ""))
    absent = subprocess.run(base, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert absent.returncode == 0 and absent.stdout.count("reusing the finished run") == 2, absent.stderr[-2000:]
    moe = tmp_path / "bench" / "moe_s2_seed0" / "config.yaml"
    text = moe.read_text()
    assert "  router_lr_scale: 0.1\n" in text  # mixtral_tiny's
    moe.write_text(text.replace("  router_lr_scale: 0.1\n", "  router_lr_scale: 0.5\n"))
    drifted = subprocess.run(base, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert drifted.returncode != 0
    assert "before a change of defaults (trainer.router_lr_scale: 0.5 -> 0.1)" in drifted.stderr
