"""How long a checkpoint stops the training: `trainer.checkpoint_format=full` against `sharded`, same run.

    python benchmarks/checkpoint_stall.py --rounds 2 --steps 12 --every 3

Trains `mixtral_base` on 2 workers (parallel.ep=2, native engine unless --override says otherwise) on a local
Ray, in interleaved rounds (full, sharded, full, sharded, ...), and reads each run's metrics.jsonl:

    stall_s      the training loop's time inside each checkpoint call (the record `kind: checkpoint`): the
                 gather and the whole write for `full`; the copy of the tensors (and any wait for the
                 previous write) for `sharded`, whose files are written by a background thread
    step_s       the median time of the steps that follow a checkpoint and of the others: the background
                 writer shares the CPU with the training
    run_s        the whole `train()` call, the last checkpoint's write included

The final checkpoint (at --steps) is left out of stall_s: the sharded run's writer finishes it at the end.
Prints a table of medians and one JSON line. The embedded corpus is prepared once into RUN_ROOT/data.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["logger.wandb.mode=disabled", "logger.progress_bar=false", "logger.ray_metrics=false", "logger.plots=false"]
FORMATS = ("full", "sharded")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def measure(args: argparse.Namespace) -> dict:
    import ray
    from hydra import compose, initialize_config_dir

    sys.path.insert(0, str(ROOT))
    from cluster.config import register_configs
    from cluster.launch import train
    from cluster.metrics import read_metrics

    register_configs()
    run_root = Path(args.run_root).resolve() / f"stall-{time.strftime('%Y%m%d-%H%M%S')}"
    data = Path(args.run_root).resolve() / "data"
    base = ["+experiment=mixtral_base", f"trainer.run_root={run_root}", f"data.output={data}",
            "cluster.num_workers=2", "cluster.cpus_per_worker=1", "parallel.ep=2", f"trainer.max_steps={args.steps}",
            f"trainer.checkpoint_every={args.every}", f"trainer.keep_last={args.steps // args.every + 1}",
            "trainer.eval_every=0", "trainer.eval_batches=1", "trainer.diagnostics_every=0", *QUIET, *args.override]
    measured = {fmt: {"stall_s": [], "step_after_s": [], "step_other_s": [], "run_s": [], "bytes": []}
                for fmt in FORMATS}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    for round_index in range(args.rounds):
        for fmt in FORMATS:
            name = f"stall_{fmt}_r{round_index}"
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = compose(config_name="config", overrides=[*base, f"name={name}",
                                                               f"trainer.checkpoint_format={fmt}"])
            start = time.perf_counter()
            train(cfg)
            row = measured[fmt]
            row["run_s"].append(time.perf_counter() - start)
            records = read_metrics(run_root / name)
            saves = {r["step"]: r["stall_s"] for r in records if r["kind"] == "checkpoint" and r["step"] < args.steps}
            row["stall_s"] += list(saves.values())
            for r in records:
                if r["kind"] == "train" and r["step"] > 1:
                    row["step_after_s" if r["step"] - 1 in saves else "step_other_s"].append(r["step_time_s"])
            last = run_root / name / "checkpoints" / f"step_{args.steps:08d}"
            row["bytes"].append(sum(p.stat().st_size for p in last.rglob("*") if p.is_file()))
    ray.shutdown()
    rows = [{"format": fmt, "stall_s_median": _median(v["stall_s"]), "stall_s": v["stall_s"],
             "step_after_checkpoint_s_median": _median(v["step_after_s"]),
             "step_other_s_median": _median(v["step_other_s"]), "run_s": v["run_s"],
             "checkpoint_bytes": v["bytes"][-1]} for fmt, v in measured.items()]
    return {"benchmark": "checkpoint_stall", "experiment": "mixtral_base", "workers": 2, "rounds": args.rounds,
            "steps": args.steps, "every": args.every, "override": args.override, "rows": rows,
            "stall_ratio_full_over_sharded": rows[0]["stall_s_median"] / rows[1]["stall_s_median"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the two formats")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--every", type=int, default=3, help="trainer.checkpoint_every")
    p.add_argument("--run-root", default="runs/benchmarks")
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    args = p.parse_args()
    result = measure(args)
    print(f"{'format':<10}{'stall s (median)':>18}{'step after ckpt s':>19}{'other steps s':>15}{'run s':>22}"
          f"{'MB':>8}")
    for r in result["rows"]:
        print(f"{r['format']:<10}{r['stall_s_median']:>18.3f}{r['step_after_checkpoint_s_median']:>19.3f}"
              f"{r['step_other_s_median']:>15.3f}{' '.join(f'{v:.0f}' for v in r['run_s']):>22}"
              f"{r['checkpoint_bytes'] / 2**20:>8.0f}")
    print(f"stall, full / sharded: {result['stall_ratio_full_over_sharded']:.1f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
