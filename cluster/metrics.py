"""Per-step metrics to a JSONL file, to wandb and to Ray's Prometheus endpoint (rank 0 only)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from cluster.schema import WandbConfig

METRICS_FILE = "metrics.jsonl"


class NullLogger:
    """What ranks other than 0 log with: nothing (the records are the same on every rank)."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self, summary: dict[str, Any]) -> None:
        pass


class MetricsLogger:
    """Writes one JSON line per step and mirrors it to wandb and `ray.util.metrics` gauges.

    Args:
        run_dir: the run directory (metrics.jsonl and wandb/ go there).
        wandb_cfg: dict with mode (offline|online|disabled), project, entity.
        run_name: wandb run name.
        config: the resolved job config, stored with the wandb run.
        ray_metrics: export gauges through `ray.util.metrics`.
        resume_step: on resume, lines after this step are dropped (they were
            written after the checkpoint being resumed and will be redone).
    """

    def __init__(self, run_dir: Path, wandb_cfg: WandbConfig, run_name: str, config: dict[str, Any],
                 ray_metrics: bool, resume_step: int = 0) -> None:
        self.path = run_dir / METRICS_FILE
        run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        self._file = self.path.open("a")
        self._wandb = None
        if wandb_cfg.mode != "disabled":
            import wandb

            self._wandb = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity,
                                     mode=wandb_cfg.mode, dir=str(run_dir), name=run_name, config=config,
                                     resume="allow", id=_wandb_id(run_dir))
        self._gauges: dict[str, Any] = {}
        self._ray_metrics = ray_metrics

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [json.dumps(record) for record in read_metrics(self.path.parent) if record.get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def _gauge(self, name: str, description: str, tag_keys: tuple[str, ...] = ()):
        if name not in self._gauges:
            from ray.util.metrics import Gauge

            self._gauges[name] = Gauge(name, description=description, tag_keys=tag_keys)
        return self._gauges[name]

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            for layer, value in enumerate(record.get("max_over_mean_load", [])):
                flat[f"moe/layer{layer}/max_over_mean_load"] = value
            for layer, value in enumerate(record.get("dropped_fraction", [])):
                flat[f"moe/layer{layer}/dropped_fraction"] = value
            for layer, value in enumerate(record.get("router_entropy", [])):
                flat[f"moe/layer{layer}/router_entropy"] = value
            for layer, value in enumerate(record.get("min_over_mean_load", [])):
                flat[f"moe/layer{layer}/min_over_mean_load"] = value
            for layer, value in enumerate(record.get("topk_change_fraction") or []):
                flat[f"moe/layer{layer}/topk_change_fraction"] = value
            for group, value in record.get("grad_norm_by_group", {}).items():
                flat[f"grad_norm/{group}"] = value
            self._wandb.log(flat, step=record["step"])
        if self._ray_metrics and record.get("kind") == "train":
            self._gauge("moe_train_loss", "training loss (language model)").set(_finite(record["loss"]))
            self._gauge("moe_train_tokens_per_second", "training throughput").set(record["tokens_per_s"])
            self._gauge("moe_train_step", "optimizer step").set(record["step"])
            load = self._gauge("moe_expert_max_over_mean_load", "max/mean tokens per expert", ("layer",))
            mean = self._gauge("moe_expert_mean_load", "mean tokens per expert", ("layer",))
            maxg = self._gauge("moe_expert_max_load", "max tokens per expert", ("layer",))
            dropped = self._gauge("moe_dropped_token_fraction", "dropped assignments / all", ("layer",))
            entropy = self._gauge("moe_router_entropy", "mean entropy of the router's distribution (nats)",
                                  ("layer",))
            for layer, value in enumerate(record.get("max_over_mean_load", [])):
                tags = {"layer": str(layer)}
                load.set(value, tags=tags)
                mean.set(record["mean_load"][layer], tags=tags)
                maxg.set(record["max_load"][layer], tags=tags)
                dropped.set(record["dropped_fraction"][layer], tags=tags)
                if "router_entropy" in record:
                    entropy.set(record["router_entropy"][layer], tags=tags)

    def close(self, summary: Optional[dict[str, Any]] = None) -> None:
        self._file.close()
        if self._wandb is not None:
            if summary:
                for key, value in summary.items():
                    if isinstance(value, (int, float)):
                        self._wandb.summary[key] = value
            self._wandb.finish()


def _finite(value: float) -> float:
    return value if math.isfinite(value) else float("nan")


def _wandb_id(run_dir: Path) -> str:
    """A stable wandb run id per run directory, so a resumed run continues the same wandb run."""
    id_file = run_dir / "wandb_id.txt"
    if not id_file.exists():
        import uuid

        id_file.write_text(uuid.uuid4().hex[:12])
    return id_file.read_text().strip()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl; a line cut short by a killed process is left out."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
