"""Training checkpoints: everything needed to continue a run exactly, and how to find a sound one.

A checkpoint directory `run_dir/checkpoints/step_00000100/` holds
  model.safetensors, config.json   the full model (single-process layout; a
                                   `moe.load_checkpoint` directory), or with
  model/, config.json              trainer.checkpoint_format=sharded each rank's
                                   shards (torch.distributed.checkpoint, written
                                   in the background: cluster/sharded_checkpoint.py;
                                   `moe.load_checkpoint` reads it too)
  optimizer_rank{r}.safetensors    each rank's part of the optimizer state, in
                                   the writer's layout (another layout or
                                   number of workers reshards it: cluster/reshard.py)
  rng_rank{r}.safetensors          each rank's torch RNG state
  tokenizer.json                   the prepared data's tokenizer (serving needs it)
  train_state.json                 step, data-loader state, counters, the
                                   writer's engine, ep and world size, and the
                                   size and sha256 of every other file
No pickle anywhere, but DCP's index model/.metadata, which is unpickled with
only DCP's metadata classes admitted (`moe.checkpoint.metadata_reader`).

NOTE: atomicity and integrity.
 1. Rank 0 creates `.tmp-step_N`; every rank writes its files there and
    hashes them while they are still in the page cache. (A sharded
    checkpoint does all of this in a writer thread, once its tensors are
    copied: cluster/sharded_checkpoint.py.)
 2. The digests are gathered to rank 0, which writes train_state.json last
    (its presence marks the directory complete) and renames the directory to
    `step_N`. A crash before that leaves only a `.tmp-*` directory, never read.
 3. Old checkpoints beyond `keep_last` are pruned by rank 0. Ray Train is not
    told about checkpoints at all: the directory on disk is the only record,
    so nothing Ray remembers can disagree with it (pruned or damaged ones).
 4. On resume, `verify_checkpoint` re-reads every file against its recorded
    size and digest; `resolve_resume` skips damaged checkpoints newest first
    (naming the bad file) and never deletes anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from moe.checkpoint import WEIGHTS_NAME, write_model_state
from moe.files import TOKENIZER_NAME

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAIN_STATE = "train_state.json"
SUPERSEDED_DIR = "superseded"
_HASH_CHUNK = 8 << 20


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_dirs(checkpoint_root: Path) -> list[Path]:
    """Every `step_N` directory, complete or not, oldest first."""
    if not checkpoint_root.is_dir():
        return []
    return sorted((p for p in checkpoint_root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()),
                  key=lambda p: p.name)


def list_checkpoints(checkpoint_root: Path) -> list[Path]:
    """Complete checkpoints (train_state.json present), oldest first."""
    return [p for p in step_dirs(checkpoint_root) if (p / TRAIN_STATE).is_file()]


def latest_checkpoint(checkpoint_root: Path) -> Optional[Path]:
    checkpoints = list_checkpoints(checkpoint_root)
    return checkpoints[-1] if checkpoints else None


def file_digest(path: Path) -> dict[str, Any]:
    """{"size": bytes, "sha256": hex} of a file."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def read_train_state(path: Path) -> dict[str, Any]:
    """The parsed train_state.json of a checkpoint; ValueError naming the file when it is missing or corrupt."""
    state_file = path / TRAIN_STATE
    if not state_file.is_file():
        raise ValueError(f"{state_file} is missing")
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{state_file} is not valid JSON ({err})") from err
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{state_file} has no integer 'step'")
    return state


def verify_checkpoint(path: Path) -> Optional[str]:
    """Checks a checkpoint against the sizes and digests in its train_state.json.

    Every file the writing ranks wrote is recorded there, so a sound checkpoint
    holds the optimizer and RNG state of each of its ranks, whatever the
    number of workers that resumes it (see `load_training_checkpoint`).

    Args:
        path: a `step_N` directory.
    Returns:
        None when it is sound, else one line naming the damaged or missing file.
    """
    try:
        state = read_train_state(path)
    except ValueError as err:
        return str(err)
    files = state.get("files")
    if files is None:  # written before digests were recorded: check that every safetensors header parses
        from safetensors import safe_open

        for name in [WEIGHTS_NAME] + sorted(p.name for p in path.glob("*_rank*.safetensors")):
            try:
                with safe_open(str(path / name), framework="pt") as handle:
                    handle.keys()
            except Exception as err:  # safetensors raises its own error types
                return f"{path / name} cannot be read ({type(err).__name__}: {err})"
        return None
    for name, expected in sorted(files.items()):
        problem = recorded_file_problem(path / name, expected)
        if problem is not None:
            return problem
    return None


def recorded_file_problem(file: Path, expected: dict[str, Any]) -> Optional[str]:
    """None when `file` has the size and sha256 recorded for it, else one line naming what is wrong."""
    if not file.is_file():
        return f"{file} is missing"
    size = file.stat().st_size
    if size != expected["size"]:
        return f"{file} has {size} bytes, {expected['size']} were written"
    if file_digest(file)["sha256"] != expected["sha256"]:
        return f"{file} does not match its recorded sha256 (the file was modified or damaged)"
    return None


def save_training_checkpoint(checkpoint_root: Path, step: int, rank: int, *,
                             write_model: Callable[[Path, int, dict[str, Any]], list[str]],
                             model_config: dict[str, Any], optimizer_state: dict[str, torch.Tensor],
                             rng_state: torch.Tensor, train_state: dict[str, Any], barrier: Callable[[], None],
                             gather: Callable[[Any], list[Any]], keep_last: int,
                             tokenizer_file: Optional[Path] = None) -> Path:
    """Writes one checkpoint collectively (every rank calls it). See the module NOTE.

    Args:
        write_model: `write_model(directory, rank, model_config)` writes this rank's model files into the
            checkpoint's directory and returns their names (relative to it): `full_model_writer`'s, or the
            sharded writer's (cluster/sharded_checkpoint.py).
        rng_state: this rank's `torch.get_rng_state()`.
        train_state: JSON-able state written by rank 0 (step, loader, counters).
        barrier: a barrier over all ranks.
        gather: all-gathers one picklable object per rank (rank order).
        tokenizer_file: the prepared data's tokenizer.json, copied beside the
            model so that the checkpoint can be served on its own.
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
    written = [f"optimizer_rank{rank}.safetensors", f"rng_rank{rank}.safetensors"]
    save_file(optimizer_state, str(tmp / written[0]))
    save_file({"torch": rng_state}, str(tmp / written[1]))
    written += write_model(tmp, rank, model_config)
    if rank == 0 and tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_NAME)
        written.append(TOKENIZER_NAME)
    digests = gather({name: file_digest(tmp / name) for name in written})
    if rank == 0:
        files = {name: d for per_rank in digests for name, d in per_rank.items()}
        # train_state.json last: its presence marks the directory complete.
        (tmp / TRAIN_STATE).write_text(json.dumps({**train_state, "files": files}, indent=2, sort_keys=True))
        if final.exists():  # this step re-run after a restart within the same launch: replace our own checkpoint
            if read_train_state_or_none(final) is None:
                raise RuntimeError(f"{final} exists and is not a training checkpoint; refusing to replace it")
            old = final.with_name(f".old-{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        for previous in list_checkpoints(checkpoint_root)[:-keep_last]:
            shutil.rmtree(previous)
    barrier()
    return final


def full_model_writer(full_model_state: Optional[dict[str, torch.Tensor]]
                      ) -> Callable[[Path, int, dict[str, Any]], list[str]]:
    """The `write_model` of the full format: rank 0 writes the gathered model (`full_model_state`, None on the
    other ranks) as model.safetensors and config.json; the other ranks write no model file."""
    def write(directory: Path, rank: int, model_config: dict[str, Any]) -> list[str]:
        if rank != 0:
            return []
        assert full_model_state is not None
        return write_model_state(full_model_state, model_config, directory)

    return write


def read_train_state_or_none(path: Path) -> Optional[dict[str, Any]]:
    try:
        return read_train_state(path)
    except ValueError:
        return None


def load_training_checkpoint(path: Path, rank: int) -> dict[str, Any]:
    """Restores this rank's RNG state; returns the checkpoint's train_state.

    The worker loads the model (model.safetensors whole, or the sharded model/ through
    `cluster.sharded_checkpoint.load_model`) and the optimizer state (`optimizer_rank{rank}` when the layout is
    the writer's, else every rank's file through `cluster.reshard`). A rank beyond the writer's world size takes
    the RNG state of rank `rank % world size`: the data order is global, and the model draws random numbers only
    for router jitter.
    """
    state = read_train_state(path)
    writers = state.get("world_size") or len(list(path.glob("rng_rank*.safetensors")))
    torch.set_rng_state(load_file(str(path / f"rng_rank{rank % writers}.safetensors"))["torch"])
    return state


class ResumeError(ValueError):
    """No usable checkpoint for the requested resume; the message names the file at fault."""


def resolve_resume(checkpoint_root: Path, resume: Optional[str], warn: Callable[[str], None] = print
                   ) -> Optional[Path]:
    """Which checkpoint a launch starts from, decided on the driver before Ray starts.

    Args:
        checkpoint_root: the run's `checkpoints/` directory.
        resume: None (fresh), "auto" (the newest sound checkpoint, or fresh when
            there is none) or a checkpoint directory.
        warn: where to report a damaged checkpoint that is skipped.
    Returns:
        The checkpoint directory, or None to start from step 0.
    Raises:
        ResumeError: an explicit checkpoint that is damaged or missing, or
            `auto` with checkpoints on disk none of which is sound.
    """
    if resume in (None, ""):
        return None
    if resume != "auto":
        path = Path(resume).resolve()
        if not path.is_dir():
            raise ResumeError(f"trainer.resume: {path} is not a directory")
        problem = verify_checkpoint(path)
        if problem is not None:
            raise ResumeError(f"trainer.resume: {path} is damaged: {problem}")
        return path
    candidates = step_dirs(checkpoint_root)
    for path in reversed(candidates):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warn(f"[moe.train] warning: skipping damaged checkpoint {path.name}: {problem}")
    if candidates:
        raise ResumeError(f"trainer.resume=auto: none of the {len(candidates)} checkpoints in {checkpoint_root} "
                          f"is intact (see the warnings above); nothing was deleted")
    return None


def set_aside_newer(checkpoint_root: Path, start: Optional[Path], warn: Callable[[str], None] = print) -> list[Path]:
    """Moves the checkpoints newer than `start` into `checkpoints/superseded/<time>/`.

    A run resumed from an older checkpoint (a named one, or the newest intact
    one behind damaged ones) would otherwise overwrite or prune them, and a
    later `resume=auto` would jump back onto the old line. Nothing is deleted.
    Returns the new locations.
    """
    if start is None:
        return []
    match = STEP_DIR.match(start.name)
    if match and start.parent.resolve() == checkpoint_root.resolve():
        start_step = int(match.group(1))
    else:
        start_step = -1  # a checkpoint of another run: every checkpoint here belongs to a line it replaces
    newer = [p for p in step_dirs(checkpoint_root) if int(STEP_DIR.match(p.name).group(1)) > start_step]
    if not newer:
        return []
    aside = checkpoint_root / SUPERSEDED_DIR / time.strftime("%Y%m%d-%H%M%S")
    aside.mkdir(parents=True, exist_ok=False)
    moved = []
    for path in newer:
        os.replace(path, aside / path.name)
        moved.append(aside / path.name)
    warn(f"[moe.train] resuming from {start}: moved the {len(moved)} newer checkpoint(s) "
         f"({', '.join(p.name for p in moved)}) to {aside} (kept, not deleted)")
    return moved
