"""Training comparisons on the CPU, each against its baseline in the same run.

    python benchmarks/train_compare.py throughput --rounds 3      # mixtral_tiny tokens/s: 1 vs 2 workers (ep=1, 2),
                                              # native vs fsdp engine, interleaved rounds, medians
    python benchmarks/train_compare.py quality --seeds 3 --steps 300 600
                                              # mixtral_tiny vs dense_tiny (equal active FLOPs) and
                                              # fixed_root length curriculum vs none: validation loss
                                              # (--variants: which runs; moe_fast_router has the routers at
                                              # the full lr; moe_previous_default is
                                              # mixtral_tiny before the issue-10 changes)
    python benchmarks/train_compare.py quality --variants moe_d64 dense_d64 moe_d32 dense_d32 --steps 1500
                                              # the same pair at half and a quarter of the width
    python benchmarks/train_compare.py sweep --lrs 1.5e-3 3e-3 6e-3 --steps 300
                                              # the learning rate of both models (--variants: another pair)
    python benchmarks/train_compare.py quality --variants moe moe_distilled --steps 150 --seeds 3 \
        --teacher runs/mixtral_base/checkpoints/step_00001000 --flops-matched
                                              # mixtral_tiny distilled from the teacher vs from scratch at
                                              # equal steps, and from scratch at the distilled run's total
                                              # FLOPs (teacher forward passes counted)

Every quality or sweep run is a real `python -m moe.train` process on the
embedded default corpus, prepared once into RUN_ROOT/data with
--validation-fraction of the documents held out (default 0.05: 88 documents,
about 378k tokens; the evaluation reads --eval-batches global batches of it).
Seed s sets both the initial weights and the data order (trainer.seed,
data.seed), so the MoE and the dense run of a seed see the same batches.
Runs already finished under RUN_ROOT are reused and unfinished ones resume
from their last checkpoint, so a long suite can be stopped and started again.
A run is reused only if its command line is the same and its stored config
(model, trainer, data) equals what that command composes today, so a changed
default in conf/ is never mixed with runs trained before it.

Prints a table (mean ± sample standard deviation over seeds), the
comparisons and one JSON line, and plots the validation loss against step
(mean and ±1 std band) in RUN_ROOT/<suite>_curves_<steps>_<variants>.png.
`--dry-run` prints the runs only.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["logger.wandb.mode=disabled", "logger.progress_bar=false", "logger.ray_metrics=false"]


def curriculum_overrides(steps: int) -> list[str]:
    """The curriculum of the old single-seed claim: length percentiles paced by a square root over 60% of
    the steps, from the shortest 10%."""
    return ["data.curriculum.schedule=fixed_root", "data.curriculum.metric=length",
            f"data.curriculum.total_curriculum_step={int(steps * 0.6)}", "data.curriculum.min_difficulty=10",
            "data.curriculum.root_degree=2"]


def at_width(width: int, dense: bool) -> list[str]:
    """mixtral_tiny or dense_tiny at another width with the same proportions (experts 2x the width, the dense
    SwiGLU top_k = 2 experts wide), so the pair keeps equal active FLOPs: for the MoE's gain against the
    tokens per parameter, at a fixed token count."""
    ffn = [f"model.experts.hidden_size={2 * width}"] + ([f"model.dense_hidden_size={4 * width}"] if dense else [])
    return [f"model.hidden_size={width}", *ffn]


# name: (experiment, overrides given the run's steps, the baseline it is compared with)
VARIANTS = {
    "moe": ("mixtral_tiny", lambda steps: [], "dense"),
    "dense": ("dense_tiny", lambda steps: [], None),
    "moe_fixed_root": ("mixtral_tiny", curriculum_overrides, "moe"),
    # mixtral_tiny before the issue-10 changes: Mixtral's 8 experts of 256, top-2, balancing coefficients 0.01
    # (load) and 0.001 (z) averaged over the 4 MoE layers, i.e. a quarter of that per layer in today's sum.
    "moe_previous_default": ("mixtral_tiny", lambda steps: [
        "model.experts.num_experts=8", "model.experts.hidden_size=256", "model.router.top_k=2",
        "model.router.aux_loss_coef=0.0025", "model.router.z_loss_coef=0.00025", "model.router.bias_update_rate=0",
        "trainer.router_lr_scale=1.0"], "dense"),
    # The routers at the experts' learning rate, mixtral_tiny's default before router_lr_scale 0.1
    # (docs/results/moe_vs_dense.md).
    "moe_fast_router": ("mixtral_tiny", lambda steps: ["trainer.router_lr_scale=1.0"], "moe"),
    # mixtral_tiny distilled from --teacher (trainer.distill defaults: weight 0.5, temperature 1, forward KL).
    "moe_distilled": ("mixtral_tiny", lambda steps: [], "moe"),
    # The same pair at a half and a quarter of the width (hidden 64 / 32, 4 heads): about 4x and 16x fewer
    # non-embedding parameters for the same tokens.
    **{f"{kind}_d{width}": (experiment, lambda steps, w=width, d=kind == "dense": at_width(w, d),
                            None if kind == "dense" else f"dense_d{width}")
       for width in (64, 32) for kind, experiment in (("moe", "mixtral_tiny"), ("dense", "dense_tiny"))},
}
DEFAULT_VARIANTS = ["moe", "dense", "moe_fixed_root"]


@dataclass
class RunSpec:
    """One `python -m moe.train` process of a suite."""

    variant: str
    experiment: str
    steps: int
    seed: int
    overrides: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.variant}_s{self.steps}_seed{self.seed}"


def quality_specs(steps_list: list[int], seeds: int, variants: list[str],
                  teacher: Optional[str] = None) -> list[RunSpec]:
    # seed-major: a partial suite still holds complete pairs
    return [RunSpec(v, VARIANTS[v][0], steps, seed, VARIANTS[v][1](steps) + distill_overrides(v, teacher))
            for steps in steps_list for seed in range(seeds) for v in variants]


def distill_overrides(variant: str, teacher: Optional[str]) -> list[str]:
    if "distilled" not in variant:
        return []
    if teacher is None:
        raise SystemExit(f"variant {variant} needs --teacher CKPT")
    return [f"trainer.distill.teacher={Path(teacher).resolve()}"]


def flops_matched_steps(steps: int, args: argparse.Namespace) -> int:
    """The from-scratch steps of the distilled run's FLOPs: steps x (student training + teacher forward) /
    student training, per token, from the composed configs."""
    from cluster.config import model_config_from
    from cluster.teacher import teacher_flops_per_token
    from moe.checkpoint import read_model_config
    from moe.model import training_flops_per_token

    from omegaconf import OmegaConf

    cfg = OmegaConf.create(composed_config([f"+experiment={VARIANTS['moe'][0]}", *args.override]))
    student = training_flops_per_token(model_config_from(cfg, args.vocab_size), cfg.data.seq_len)
    teacher = teacher_flops_per_token(read_model_config(args.teacher), cfg.data.seq_len)
    return round(steps * (student + teacher) / student)


def sweep_specs(steps_list: list[int], seeds: int, lrs: list[float],
                variants: tuple[str, ...] = ("moe", "dense")) -> list[RunSpec]:
    return [RunSpec(f"{v}_lr{lr:g}", VARIANTS[v][0], steps, seed, [*VARIANTS[v][1](steps), f"trainer.lr={lr}"])
            for steps in steps_list for seed in range(seeds) for lr in lrs for v in variants]


def compared_pairs(variants: list[str]) -> list[tuple[str, str]]:
    """(variant, baseline) for every variant whose baseline runs too."""
    return [(v, VARIANTS[v][2]) for v in variants if VARIANTS[v][2] in variants]


def command(spec: RunSpec, args: argparse.Namespace) -> list[str]:
    run_root = Path(args.run_root).resolve()
    return [sys.executable, "-m", "moe.train", f"+experiment={spec.experiment}", f"name={spec.name}",
            f"trainer.run_root={run_root}", f"trainer.max_steps={spec.steps}", f"trainer.seed={spec.seed}",
            f"data.seed={spec.seed}", f"trainer.eval_every={max(1, spec.steps // args.eval_points)}",
            f"trainer.eval_batches={args.eval_batches}", f"trainer.checkpoint_every={max(1, spec.steps // 4)}",
            f"data.output={run_root / 'data'}", f"data.validation_fraction={args.validation_fraction}",
            "trainer.resume=auto", *QUIET, *spec.overrides, *args.override]


COMPARED_GROUPS = ("model", "trainer", "data")  # what a run learns from; cluster and logger do not change it


def composed_config(overrides: list[str]) -> dict[str, Any]:
    """The resolved config `python -m moe.train OVERRIDES` composes today."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    sys.path.insert(0, str(ROOT))
    from cluster.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="config", overrides=overrides), resolve=True)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def config_drift(argv: list[str], run_dir: Path) -> list[str]:
    """The settings in which `run_dir` was trained differently from what its command composes today (a
    changed default in conf/), as "key: then -> now". A key the stored config lacks (added to the schema
    since) counts as its base default, the value without any experiment."""
    import yaml

    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    now, base = composed_config(argv[3:]), composed_config([])  # argv: python -m moe.train OVERRIDES
    drift = []
    for group in COMPARED_GROUPS:
        then, base_group = _flat(stored.get(group) or {}), _flat(base[group])
        for key, value in _flat(now[group]).items():
            old = then.get(key, base_group.get(key))
            if old != value:
                drift.append(f"{group}.{key}: {old!r} -> {value!r}")
    return drift


def execute(spec: RunSpec, args: argparse.Namespace) -> dict[str, Any]:
    """Runs (or reuses) one training process and returns its result row."""
    run_root = Path(args.run_root).resolve()
    run_dir, command_file = run_root / spec.name, run_root / f"{spec.name}.command.json"
    argv = command(spec, args)
    if command_file.exists() and json.loads(command_file.read_text()) != argv[1:]:
        raise SystemExit(f"[train_compare] {run_dir} was trained with other settings (see {command_file}): "
                         f"pass another --run-root")
    if (run_dir / "config.yaml").exists():
        drift = config_drift(argv, run_dir)
        if drift:
            raise SystemExit(f"[train_compare] {run_dir} was trained before a change of defaults ({'; '.join(drift)})"
                             f": pass another --run-root, or move it away to retrain it")
    command_file.write_text(json.dumps(argv[1:]))
    if not (run_dir / "summary.json").exists():
        log = run_root / f"{spec.name}.log"
        print(f"[train_compare] {spec.name}: training (log: {log})", flush=True)
        if not any(o.startswith("cluster.dashboard_port=") for o in args.override):
            argv.append(f"cluster.dashboard_port={free_port()}")  # other Rays may run here: not part of the run
        with open(log, "w") as out:
            code = subprocess.run(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise SystemExit(f"[train_compare] {spec.name} failed (exit {code}); see {log}")
    else:
        print(f"[train_compare] {spec.name}: reusing the finished run", flush=True)
    return result_row(spec, run_dir)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def result_row(spec: RunSpec, run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    curve = {}
    for record in evals:  # a resumed run may have logged a step twice: the last one wins
        curve[record["step"]] = record["val_loss"]
    batch_losses = evals[-1].get("val_batch_losses") if evals else None
    return {"name": spec.name, "variant": spec.variant, "experiment": spec.experiment, "steps": spec.steps,
            "seed": spec.seed, "overrides": spec.overrides, "val_loss": summary["val_loss"],
            "val_loss_stderr": summary.get("val_loss_stderr"), "final_train_loss": summary.get("final_train_loss"),
            "tokens_per_s": summary.get("tokens_per_s"), "curve": sorted(curve.items()),
            "val_batch_losses": batch_losses}


def paired_stderr(a: Optional[list[float]], b: Optional[list[float]]) -> float:
    """Standard error of a - b from the validation sample alone: both runs scored the same batches, so the
    spread of the per-batch differences over sqrt(batches) (nan without per-batch losses)."""
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return float("nan")
    return statistics.stdev(x - y for x, y in zip(a, b)) / math.sqrt(len(a))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float, float]]:
    """(step, mean, std) at the evaluation steps all curves share."""
    shared = sorted(set.intersection(*(set(s for s, _ in c) for c in curves))) if curves else []
    by_step = [dict(c) for c in curves]
    return [(s, *mean_std([c[s] for c in by_step])) for s in shared]


def first_step_reaching(curve: list[tuple[int, float]], target: float) -> Optional[float]:
    """The first step at which the curve is at or below target, linearly interpolated between evaluations
    (from step 0 at +inf loss: a curve already below target at its first point reaches it there)."""
    previous: Optional[tuple[int, float]] = None
    for step, loss in curve:
        if loss <= target:
            if previous is None or previous[1] == loss:
                return float(step)
            (s0, l0) = previous
            return s0 + (step - s0) * (l0 - target) / (l0 - loss)
        previous = (step, loss)
    return None


def compare(rows: list[dict[str, Any]], variant: str, baseline: str) -> list[dict[str, Any]]:
    """variant vs baseline at each length: means, seed standard deviations, the paired per-seed gap, the
    margin in standard deviations, and when the variant's mean curve reaches the baseline's final loss."""
    out = []
    for steps in sorted({r["steps"] for r in rows}):
        a = {r["seed"]: r for r in rows if r["variant"] == variant and r["steps"] == steps}
        b = {r["seed"]: r for r in rows if r["variant"] == baseline and r["steps"] == steps}
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue
        mean_a, std_a = mean_std([a[s]["val_loss"] for s in seeds])
        mean_b, std_b = mean_std([b[s]["val_loss"] for s in seeds])
        gap, gap_std = mean_std([a[s]["val_loss"] - b[s]["val_loss"] for s in seeds])
        val_noise = statistics.fmean(paired_stderr(a[s]["val_batch_losses"], b[s]["val_batch_losses"])
                                     for s in seeds)
        seed_std = max(std_a, std_b)
        reach = first_step_reaching([(s, m) for s, m, _ in mean_curve([a[s]["curve"] for s in seeds])], mean_b)
        out.append({"variant": variant, "baseline": baseline, "steps": steps, "seeds": len(seeds),
                    "mean": mean_a, "std": std_a, "baseline_mean": mean_b, "baseline_std": std_b,
                    "gap": gap, "paired_gap_std": gap_std, "gap_validation_stderr": val_noise,
                    "gap_in_seed_stds": (-gap / seed_std) if seed_std > 0 else float("nan"),
                    "wins_by_2_std": bool(seed_std > 0 and -gap > 2 * seed_std),
                    "reaches_baseline_final_at_step": reach,
                    "reaches_baseline_final_fraction": None if reach is None else reach / steps})
    return out


def print_tables(rows: list[dict[str, Any]], comparisons: list[dict[str, Any]]) -> None:
    print(f"\n{'variant':<18}{'steps':>6}{'seeds':>6}{'val loss (mean ± std)':>24}{'val stderr':>11}"
          f"{'tokens/s':>10}  per seed")
    for variant in dict.fromkeys(r["variant"] for r in rows):
        for steps in sorted({r["steps"] for r in rows if r["variant"] == variant}):
            group = [r for r in rows if r["variant"] == variant and r["steps"] == steps]
            mean, std = mean_std([r["val_loss"] for r in group])
            stderr = statistics.fmean(r["val_loss_stderr"] or float("nan") for r in group)
            tps = statistics.median(r["tokens_per_s"] or float("nan") for r in group)
            per_seed = " ".join(f"{r['val_loss']:.4f}" for r in sorted(group, key=lambda r: r["seed"]))
            print(f"{variant:<18}{steps:>6}{len(group):>6}{mean:>15.4f} ± {std:<6.4f}{stderr:>11.4f}"
                  f"{tps:>10.0f}  {per_seed}")
    if comparisons:
        print(f"\n{'comparison':<26}{'steps':>6}{'gap (paired)':>22}{'val SE':>8}{'margin':>9}{'> 2 std':>9}"
              f"{'reaches baseline final at':>28}")
        for c in comparisons:
            reach = ("not reached" if c["reaches_baseline_final_at_step"] is None else
                     f"step {c['reaches_baseline_final_at_step']:.0f} ({c['reaches_baseline_final_fraction']:.0%})")
            print(f"{c['variant'] + ' vs ' + c['baseline']:<26}{c['steps']:>6}"
                  f"{c['gap']:>+13.4f} ± {c['paired_gap_std']:<6.4f}{c['gap_validation_stderr']:>8.4f}"
                  f"{c['gap_in_seed_stds']:>9.2f}"
                  f"{'yes' if c['wins_by_2_std'] else 'no':>9}{reach:>28}")
        print("gap: variant minus baseline validation loss, mean ± std over seeds of the per-seed difference; "
              "val SE: standard error of a seed's gap from the validation sample alone (per-batch differences); "
              "margin: -(gap of the means) / max(seed std of either); reach: the variant's mean curve at the "
              "baseline's final mean loss")


def plot_curves(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["steps"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.2), squeeze=False)
    for ax, steps in zip(axes[0], lengths):
        for variant in dict.fromkeys(r["variant"] for r in rows if r["steps"] == steps):
            group = [r for r in rows if r["variant"] == variant and r["steps"] == steps]
            points = mean_curve([r["curve"] for r in group])
            xs = [p[0] for p in points]
            means = [p[1] for p in points]
            stds = [0.0 if math.isnan(p[2]) else p[2] for p in points]
            line, = ax.plot(xs, means, "o-", markersize=3, label=f"{variant} ({len(group)} seeds)")
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=line.get_color(), alpha=0.2)
        finals = [r["val_loss"] for r in rows if r["steps"] == steps]
        ax.set_ylim(min(finals) - 0.15, min(finals) + 1.2)
        ax.set_title(f"{steps} steps (cosine schedule to step {steps})")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


THROUGHPUT_RUNS = {  # name: overrides of mixtral_tiny
    "1worker_native": ["trainer.engine=native"],
    "1worker_fsdp": ["trainer.engine=fsdp"],
    "2workers_ep1_native": ["cluster.num_workers=2", "cluster.cpus_per_worker=1", "trainer.engine=native"],
    "2workers_ep1_fsdp": ["cluster.num_workers=2", "cluster.cpus_per_worker=1", "trainer.engine=fsdp"],
    "2workers_ep2_native": ["cluster.num_workers=2", "cluster.cpus_per_worker=1", "parallel.ep=2",
                            "trainer.engine=native"],
    "2workers_ep2_fsdp": ["cluster.num_workers=2", "cluster.cpus_per_worker=1", "parallel.ep=2",
                          "trainer.engine=fsdp"],
}


def throughput(args: argparse.Namespace) -> None:
    """mixtral_tiny tokens/s per layout and engine in one local Ray: the runs interleaved round-robin over
    --rounds rounds, the median of each (its steady-state tokens/s, the first steps excluded by moe.train)."""
    import ray
    from hydra import compose, initialize_config_dir

    sys.path.insert(0, str(ROOT))
    from cluster.config import register_configs
    from cluster.launch import train

    register_configs()
    run_root = Path(args.run_root).resolve() / f"throughput-{time.strftime('%Y%m%d-%H%M%S')}"
    base = [f"trainer.max_steps={args.throughput_steps}", f"trainer.checkpoint_every={args.throughput_steps}",
            "trainer.eval_batches=1", "trainer.diagnostics_every=0", *QUIET]
    names = [n for n in THROUGHPUT_RUNS if not args.runs or n in args.runs]
    measured: dict[str, list[float]] = {name: [] for name in names}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    for round_index in range(args.rounds):
        for name in names:
            run = f"tput_{name}_r{round_index}"
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = compose(config_name="config", overrides=["+experiment=mixtral_tiny", f"name={run}",
                                                               f"trainer.run_root={run_root}", *base,
                                                               *THROUGHPUT_RUNS[name]])
            measured[name].append(train(cfg)["tokens_per_s"])
    ray.shutdown()
    rows = [{"name": name, "tokens_per_s_median": statistics.median(values), "tokens_per_s": values,
             "steps": args.throughput_steps} for name, values in measured.items()]
    print(f"{'run':<24}{'median tokens/s':>16}   rounds")
    for r in rows:
        print(f"{r['name']:<24}{r['tokens_per_s_median']:>16.0f}   " + " ".join(f"{v:.0f}" for v in r["tokens_per_s"]))
    print(json.dumps({"benchmark": "train_compare", "suite": "throughput", "rounds": args.rounds, "rows": rows}))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("suite", choices=["throughput", "quality", "sweep"])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of every run (quality, sweep)")
    p.add_argument("--steps", type=int, nargs="+", default=[300, 600], help="training lengths (quality, sweep)")
    p.add_argument("--lrs", type=float, nargs="+", default=[1.5e-3, 3e-3, 6e-3], help="sweep learning rates")
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                   help="the runs of each seed and length, each compared with its baseline (quality default: "
                        f"{' '.join(DEFAULT_VARIANTS)}; sweep default: moe dense, at every --lrs)")
    p.add_argument("--validation-fraction", type=float, default=0.05)
    p.add_argument("--eval-batches", type=int, default=40, help="global batches of 16 x 256 tokens per evaluation")
    p.add_argument("--eval-points", type=int, default=10, help="evaluations along each run (the curves)")
    p.add_argument("--throughput-steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the throughput runs")
    p.add_argument("--runs", nargs="+", choices=list(THROUGHPUT_RUNS), default=None,
                   help="throughput runs to measure (default: all)")
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    p.add_argument("--teacher", default=None, help="the teacher checkpoint of the *_distilled variants")
    p.add_argument("--flops-matched", action="store_true",
                   help="also train `moe` for as many steps as the distilled runs' FLOPs, teacher counted")
    p.add_argument("--vocab-size", type=int, default=8192, help="the prepared data's vocabulary (FLOPs only)")
    p.add_argument("--run-root", default=str(ROOT / "runs" / "bench"))
    p.add_argument("--dry-run", action="store_true", help="print the runs and their commands, train nothing")
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be at least 1, got {args.seeds}")
    if any(s < 1 for s in args.steps):
        raise SystemExit(f"--steps must be positive, got {args.steps}")
    if any(not (lr > 0 and math.isfinite(lr)) for lr in args.lrs):
        raise SystemExit(f"--lrs must be positive, got {args.lrs}")
    if not 0 < args.validation_fraction < 1:
        raise SystemExit(f"--validation-fraction must lie in (0, 1), got {args.validation_fraction}")
    if args.eval_batches < 1 or args.eval_points < 1:
        raise SystemExit("--eval-batches and --eval-points must be positive")


def main() -> None:
    args = parser().parse_args()
    check_args(args)
    if args.suite == "throughput":
        run_root = Path(args.run_root).resolve()
        if run_root.exists() and any(run_root.iterdir()):
            raise SystemExit(f"{run_root} is not empty: remove it or pass --run-root")
        return throughput(args)
    if args.variants is None:
        args.variants = DEFAULT_VARIANTS if args.suite == "quality" else ["moe", "dense"]
    specs = (quality_specs(args.steps, args.seeds, args.variants, args.teacher) if args.suite == "quality"
             else sweep_specs(args.steps, args.seeds, args.lrs, tuple(args.variants)))
    matched: dict[int, int] = {}
    if args.flops_matched:
        if args.teacher is None or "moe_distilled" not in args.variants:
            raise SystemExit("--flops-matched needs --teacher and the moe_distilled variant")
        matched = {steps: flops_matched_steps(steps, args) for steps in args.steps}
        specs += quality_specs(sorted(set(matched.values()) - set(args.steps)), args.seeds, ["moe"])
    if args.dry_run:
        for spec in specs:
            print(" ".join(command(spec, args)))
        return
    Path(args.run_root).mkdir(parents=True, exist_ok=True)
    rows = [execute(spec, args) for spec in specs]
    if args.suite == "quality":
        comparisons = [c for v, b in compared_pairs(args.variants) for c in compare(rows, v, b)]
        for steps, scratch_steps in matched.items():  # distilled at `steps` vs scratch at equal FLOPs
            same_flops = [{**r, "steps": steps, "variant": "moe_flops_matched"} for r in rows
                          if r["variant"] == "moe" and r["steps"] == scratch_steps]
            for c in compare([*rows, *same_flops], "moe_distilled", "moe_flops_matched"):
                comparisons.append({**c, "baseline_steps": scratch_steps})
    else:
        comparisons = [c for lr in args.lrs for v, b in compared_pairs(args.variants)
                       for c in compare(rows, f"{v}_lr{lr:g}", f"{b}_lr{lr:g}")]
    print_tables(rows, comparisons)
    lengths = "_".join(str(s) for s in args.steps)
    png = Path(args.run_root).resolve() / f"{args.suite}_curves_{lengths}_{'_'.join(args.variants)}.png"
    png = plot_curves(rows, png)
    print(f"validation curves: {png}")
    print(json.dumps({"benchmark": "train_compare", "suite": args.suite, "seeds": args.seeds, "steps": args.steps,
                      "validation_fraction": args.validation_fraction, "eval_batches": args.eval_batches,
                      "comparisons": comparisons, "rows": rows}))


if __name__ == "__main__":
    main()
