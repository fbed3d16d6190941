"""Model checkpoints: safetensors weights plus the JSON model config (never pickle).

A checkpoint is a directory holding `model.safetensors` and `config.json`.
It is written to a temporary sibling directory and renamed into place, so an
interrupted save never leaves a directory that looks complete and never
destroys the checkpoint it replaces until the new one is whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Union

import torch
from safetensors.torch import load_file, save_file

from moe.config import ModelConfig
from moe.model import MoETransformer

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]


def _saved_names(model: MoETransformer) -> set[str]:
    names = set(model.state_dict())
    if model.config.tie_embeddings:
        names.discard("lm_head.weight")
    return names


def model_state_for_saving(model: MoETransformer) -> dict[str, torch.Tensor]:
    """The persistent state dict, contiguous on the CPU, without a tied output head."""
    names = _saved_names(model)
    return {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items() if name in names}


def write_model_files(model: MoETransformer, directory: Path) -> None:
    """Writes the weights and config into an existing directory (no atomicity)."""
    save_file(model_state_for_saving(model), str(directory / WEIGHTS_NAME),
              metadata={"format": "pt", "moe_format_version": str(FORMAT_VERSION)})
    payload = {"moe_format_version": FORMAT_VERSION, "model": model.config.to_dict()}
    (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=2, sort_keys=True))


def replace_directory(tmp: Path, target: Path) -> None:
    """Moves the complete directory `tmp` to `target`, replacing what is there.

    The old `target` is renamed aside first and removed only after the swap, so
    at every moment either the old or the new directory is in place.
    """
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def write_directory_atomically(directory: Path, write: Callable[[Path], None]) -> Path:
    """Calls `write(tmp)` on a fresh sibling directory, then swaps it into `directory`.

    An exception (or a crash) leaves `directory` as it was.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write(tmp)
        replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def save_checkpoint(model: MoETransformer, path: PathLike) -> Path:
    """Saves `model` to the directory `path` atomically (replacing it if present).

    Args:
        model: the model; its config is stored beside the weights.
        path: the checkpoint directory.
    Returns:
        The checkpoint directory.
    """
    return write_directory_atomically(Path(path), lambda tmp: write_model_files(model, tmp))


def read_model_config(path: PathLike) -> ModelConfig:
    """Reads and validates the model config of a checkpoint directory."""
    config_file = Path(path) / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"not a moe checkpoint: {config_file} is missing")
    try:
        payload = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"corrupt checkpoint config {config_file}: {err}") from err
    if payload.get("moe_format_version") != FORMAT_VERSION or "model" not in payload:
        raise ValueError(f"{config_file} is not a moe checkpoint config of format version {FORMAT_VERSION}")
    return ModelConfig.from_dict(payload["model"])


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu",
                    dtype: torch.dtype | None = None) -> MoETransformer:
    """Rebuilds the model from a checkpoint directory's config and loads its weights.

    Args:
        path: checkpoint directory written by `save_checkpoint`.
        device: where to put the model.
        dtype: optional floating dtype to cast the parameters to.
    Raises:
        FileNotFoundError: missing files. ValueError: weights that do not fit
            the config (names the missing/unexpected tensors).
    """
    path = Path(path)
    config = read_model_config(path)
    weights_file = path / WEIGHTS_NAME
    if not weights_file.is_file():
        raise FileNotFoundError(f"not a moe checkpoint: {weights_file} is missing")
    state = load_file(str(weights_file), device="cpu")
    model = MoETransformer(config)
    expected = _saved_names(model)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint {weights_file} does not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=not config.tie_embeddings)
    if dtype is not None:
        model.to(dtype=dtype)
    return model.to(device)
