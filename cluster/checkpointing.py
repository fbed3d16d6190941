"""Training checkpoints: everything needed to continue a run exactly.

A checkpoint directory `run_dir/checkpoints/step_00000100/` holds
  model.safetensors, config.json   the full model (single-process layout; a
                                   `moe.load_checkpoint` directory)
  optimizer_rank{r}.safetensors    each rank's optimizer state (expert shards
                                   differ between expert-parallel ranks)
  rng_rank{r}.safetensors          each rank's torch RNG state
  train_state.json                 step, data-loader state, counters
No pickle anywhere.

NOTE: atomicity. 1) rank 0 creates `.tmp-step_N`; 2) every rank writes its
files there; 3) after a barrier, rank 0 renames it to `step_N` and prunes old
checkpoints. A crash before 3) leaves only a `.tmp-*` directory, which is never
read, so the previous checkpoint stays the latest complete one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from moe.checkpoint import CONFIG_NAME, WEIGHTS_NAME, FORMAT_VERSION

STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAIN_STATE = "train_state.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(checkpoint_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not checkpoint_root.is_dir():
        return []
    found = [p for p in checkpoint_root.iterdir() if STEP_DIR.match(p.name) and (p / TRAIN_STATE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(checkpoint_root: Path) -> Optional[Path]:
    checkpoints = list_checkpoints(checkpoint_root)
    return checkpoints[-1] if checkpoints else None


def save_training_checkpoint(checkpoint_root: Path, step: int, rank: int, *,
                             full_model_state: Optional[dict[str, torch.Tensor]],
                             model_config: dict[str, Any], optimizer_state: dict[str, torch.Tensor],
                             train_state: dict[str, Any], barrier: Callable[[], None], keep_last: int) -> Path:
    """Writes one checkpoint collectively (every rank calls it). See the module NOTE.

    Args:
        full_model_state: the gathered full model (rank 0), None elsewhere.
        train_state: JSON-able state written by rank 0 (step, loader, counters).
        barrier: a barrier over all ranks.
    Returns:
        The final checkpoint directory.
    """
    final = checkpoint_root / step_dir_name(step)
    tmp = checkpoint_root / f".tmp-{step_dir_name(step)}"
    if rank == 0:
        checkpoint_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    save_file(optimizer_state, str(tmp / f"optimizer_rank{rank}.safetensors"))
    save_file({"torch": torch.get_rng_state()}, str(tmp / f"rng_rank{rank}.safetensors"))
    if rank == 0:
        assert full_model_state is not None
        save_file(full_model_state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps({"moe_format_version": FORMAT_VERSION, "model": model_config},
                                                  indent=2, sort_keys=True))
    barrier()
    if rank == 0:
        # train_state.json last: its presence marks the directory complete.
        (tmp / TRAIN_STATE).write_text(json.dumps(train_state, indent=2, sort_keys=True))
        if final.exists():  # a re-run of this step after a restart
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(checkpoint_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_training_checkpoint(path: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                             dict[str, Any]]:
    """Restores this rank's RNG state; returns (full model state, this rank's optimizer state, train_state)."""
    state_file = path / TRAIN_STATE
    if not state_file.is_file():
        raise FileNotFoundError(f"incomplete or missing checkpoint: {state_file} does not exist")
    rank_file = path / f"optimizer_rank{rank}.safetensors"
    if not rank_file.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no optimizer state for rank {rank} ({rank_file.name}); "
                                f"it was written with fewer workers")
    torch.set_rng_state(load_file(str(path / f"rng_rank{rank}.safetensors"))["torch"])
    return load_file(str(path / WEIGHTS_NAME)), load_file(str(rank_file)), json.loads(state_file.read_text())
