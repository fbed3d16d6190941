"""`python -m cluster.evaluate checkpoint=PATH`: validation loss and perplexity
of a checkpoint on the validation split of the data pipeline.

PATH is a model checkpoint (`moe.save_checkpoint`) or a training checkpoint
(`runs/NAME/checkpoints/step_N`). The validation split comes from the run's
prepared data (read from the run's `config.yaml` when the checkpoint sits in
a run directory), or from `data.output=DIR`. Prints one JSON line.

Other keys: batches=N (default 50), batch_size=N (default 8), seq_len=N
(default: the run's data.seq_len), device=cpu|cuda.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from data_pipeline.loader import CurriculumLoader
from moe.checkpoint import load_checkpoint, run_config_of

USAGE = "usage: python -m cluster.evaluate checkpoint=PATH [data.output=DIR] [batches=N] [batch_size=N] [seq_len=N] [device=D]"
KEYS = ("checkpoint", "data.output", "batches", "batch_size", "seq_len", "device")


def parse_args(argv: list[str]) -> dict[str, str]:
    args = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS:
            raise ValueError(f"unknown argument {item!r}; {USAGE}")
        args[key] = value
    if "checkpoint" not in args:
        raise ValueError(f"checkpoint=PATH is required; {USAGE}")
    return args


@torch.no_grad()
def evaluate_checkpoint(checkpoint: Path, data_dir: Path, *, seq_len: int, batches: int, batch_size: int,
                        device: str) -> dict[str, Any]:
    model = load_checkpoint(checkpoint, device=device).eval()
    loader = CurriculumLoader(data_dir, seq_len=seq_len, global_batch_size=batch_size, split="validation",
                              schedule="none")
    loss_sum, tokens = 0.0, 0
    for _, batch in zip(range(batches), loader):
        out = model(batch["input_ids"].to(device), doc_ids=batch["doc_ids"].to(device),
                    targets=batch["targets"].to(device))
        n = batch["targets"].numel()
        loss_sum += out.loss.item() * n
        tokens += n
    if tokens == 0:
        raise ValueError(f"the validation split of {data_dir} yielded no batch of {batch_size} x {seq_len} tokens")
    val_loss = loss_sum / tokens
    return {"checkpoint": str(checkpoint), "data": str(data_dir), "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 50.0)), "tokens": tokens}


def main(argv: Optional[list[str]] = None) -> None:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        checkpoint = Path(args["checkpoint"])
        if not (checkpoint / "model.safetensors").is_file():
            raise ValueError(f"checkpoint={checkpoint}: no model.safetensors there")
        run_cfg = run_config_of(checkpoint) or {}
        data_cfg = run_cfg.get("data", {})
        data_dir = args.get("data.output") or data_cfg.get("output")
        if not data_dir:
            raise ValueError("data.output=DIR is required: the checkpoint is not inside a run directory")
        seq_len = int(args.get("seq_len") or data_cfg.get("seq_len") or 256)
        device = args.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        result = evaluate_checkpoint(checkpoint, Path(data_dir), seq_len=seq_len, batches=int(args.get("batches", 50)),
                                     batch_size=int(args.get("batch_size", 8)), device=device)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
