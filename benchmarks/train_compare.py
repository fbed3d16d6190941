"""Training comparisons on the CPU, each against its baseline in the same run.

    python benchmarks/train_compare.py throughput     # mixtral_tiny tokens/s: 1 worker vs 2 workers (ep=1, ep=2)
    python benchmarks/train_compare.py moe_vs_dense   # mixtral_tiny vs dense_tiny (equal active FLOPs): val loss
    python benchmarks/train_compare.py curriculum     # mixtral_tiny fixed_root vs none: val loss
    python benchmarks/train_compare.py quality        # moe_vs_dense + curriculum, sharing the MoE baseline run
    python benchmarks/train_compare.py all

Every run is a real `python -m moe.train` job (through `cluster.launch.train`)
on the embedded default corpus, on one local Ray. Prints a table and a JSON
line. Options: --steps N (quality suites, default 300), --throughput-steps N
(default 30), --run-root DIR (default runs/bench).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ray
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.config import register_configs  # noqa: E402
from cluster.launch import train  # noqa: E402

QUIET = ["logger.wandb.mode=disabled", "logger.progress_bar=false", "logger.ray_metrics=false"]


def run(name: str, run_root: Path, overrides: list[str], experiment: str = "mixtral_tiny") -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+experiment={experiment}", f"name={name}",
                                                       f"trainer.run_root={run_root}", *QUIET, *overrides])
    summary = train(cfg)
    return {"name": name, "experiment": experiment, "overrides": overrides, **{
        k: summary.get(k) for k in ("final_step", "final_train_loss", "val_loss", "val_ppl", "tokens_per_s")}}


def throughput(run_root: Path, steps: int) -> list[dict]:
    base = [f"trainer.max_steps={steps}", f"trainer.checkpoint_every={steps}", "trainer.eval_batches=1"]
    return [
        run("tput_1worker", run_root, base),
        run("tput_2workers_ep1", run_root, base + ["cluster.num_workers=2", "cluster.cpus_per_worker=1"]),
        run("tput_2workers_ep2", run_root, base + ["cluster.num_workers=2", "cluster.cpus_per_worker=1",
                                                  "parallel.ep=2"]),
    ]


def moe_vs_dense(run_root: Path, steps: int) -> list[dict]:
    base = [f"trainer.max_steps={steps}", "trainer.eval_batches=16"]
    return [run("moe", run_root, base), run("dense", run_root, base, experiment="dense_tiny")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=["throughput", "moe_vs_dense", "curriculum", "quality", "all"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--throughput-steps", type=int, default=30)
    parser.add_argument("--run-root", default=str(ROOT / "runs" / "bench"))
    args = parser.parse_args()
    run_root = Path(args.run_root).resolve()
    if run_root.exists() and any(run_root.iterdir()):
        sys.exit(f"{run_root} is not empty: remove it or pass --run-root")
    register_configs()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows: list[dict] = []
    cache: dict[str, dict] = {}
    if args.suite in ("throughput", "all"):
        rows += throughput(run_root, args.throughput_steps)
    if args.suite in ("moe_vs_dense", "quality", "all"):
        rows += moe_vs_dense(run_root, args.steps)
        cache["moe"] = rows[-2]
    if args.suite in ("curriculum", "quality", "all"):
        if "moe" not in cache:  # otherwise the moe_vs_dense run is the baseline of both comparisons
            rows.append(run("moe", run_root, [f"trainer.max_steps={args.steps}", "trainer.eval_batches=16"]))
        rows.append(run("moe_fixed_root", run_root, curriculum_overrides(args.steps)))
    ray.shutdown()

    print(f"{'run':<22}{'steps':>6}{'train loss':>12}{'val loss':>10}{'val ppl':>10}{'tokens/s':>11}")
    for r in rows:
        print(f"{r['name']:<22}{r['final_step']:>6}{r['final_train_loss']:>12.4f}{r['val_loss']:>10.4f}"
              f"{r['val_ppl']:>10.2f}{r['tokens_per_s']:>11.0f}")
    print(json.dumps({"benchmark": "train_compare", "suite": args.suite, "rows": rows}))


def curriculum_overrides(steps: int) -> list[str]:
    return [f"trainer.max_steps={steps}", "trainer.eval_batches=16", "data.curriculum.schedule=fixed_root",
            "data.curriculum.metric=length", f"data.curriculum.total_curriculum_step={int(steps * 0.6)}",
            "data.curriculum.min_difficulty=10", "data.curriculum.root_degree=2"]


if __name__ == "__main__":
    main()
