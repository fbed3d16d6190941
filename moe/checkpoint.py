"""Model checkpoints: safetensors weights plus the JSON model config (never pickle).

A checkpoint is a directory holding `model.safetensors` and `config.json`.
It is written to a temporary sibling directory and renamed into place, so an
interrupted save never leaves a directory that looks complete and never
destroys the checkpoint it replaces until the new one is whole.

The atomic swap itself (`replace_directory`, `write_directory_atomically`) is
moe/atomic.py's, re-exported here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from moe.atomic import (ReplaceRefusedError, check_replaceable, replace_directory,  # noqa: F401 (re-exported)
                        write_directory_atomically)
from moe.config import ModelConfig
from moe.model import MoETransformer

WEIGHTS_NAME = "model.safetensors"


# safetensors is imported when a checkpoint is read or written, not with `moe`: the GPU scripts import moe with
# torch alone (benchmarks/gpu_suite.py on a machine without this project's dependencies).
def save_file(state: dict[str, torch.Tensor], path: str, metadata: Optional[dict[str, str]] = None) -> None:
    from safetensors.torch import save_file as write

    write(state, path, metadata=metadata)


def load_file(path: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file as read

    return read(path, device=device)
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]


def saved_names(model: MoETransformer) -> set[str]:
    """The state-dict entries a checkpoint holds: all persistent ones but a tied output head."""
    names = set(model.state_dict())
    if model.config.tie_embeddings:
        names.discard("lm_head.weight")
    return names


def model_state_for_saving(model: MoETransformer) -> dict[str, torch.Tensor]:
    """The persistent state dict, contiguous on the CPU, without a tied output head."""
    names = saved_names(model)
    return {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items() if name in names}


def write_model_files(model: MoETransformer, directory: Path) -> None:
    """Writes the weights and config into an existing directory (no atomicity)."""
    write_model_state(model_state_for_saving(model), model.config.to_dict(), directory)


def write_model_state(state: dict[str, torch.Tensor], model_config: dict, directory: Path) -> list[str]:
    """The one writer of the checkpoint format: `state` (a `model_state_for_saving` layout, e.g. gathered
    from a sharded model) and the model config into an existing directory (no atomicity). Returns the names
    of the files written."""
    save_file(state, str(directory / WEIGHTS_NAME),
              metadata={"format": "pt", "moe_format_version": str(FORMAT_VERSION)})
    payload = {"moe_format_version": FORMAT_VERSION, "model": model_config}
    (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=2, sort_keys=True))
    return [WEIGHTS_NAME, CONFIG_NAME]


def is_model_checkpoint(path: Path) -> bool:
    """Whether `path` is a directory `save_checkpoint` wrote: our config.json and weights, nothing else.

    A training checkpoint (optimizer and RNG state beside the model) is not one:
    saving a model over it would destroy the state a run resumes from.
    """
    config_file = path / CONFIG_NAME
    if not config_file.is_file() or not {p.name for p in path.iterdir()} <= {CONFIG_NAME, WEIGHTS_NAME}:
        return False
    try:
        payload = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(payload, dict) and "moe_format_version" in payload


def save_checkpoint(model: MoETransformer, path: PathLike) -> Path:
    """Saves `model` to the directory `path` atomically.

    Args:
        model: the model; its config is stored beside the weights.
        path: the checkpoint directory; if it exists it must be empty or a
            checkpoint `save_checkpoint` wrote, which is replaced.
    Returns:
        The checkpoint directory.
    Raises:
        ReplaceRefusedError: `path` is a file or holds something else.
    """
    return write_directory_atomically(Path(path), lambda tmp: write_model_files(model, tmp),
                                      replaceable=is_model_checkpoint,
                                      kind=f"a moe checkpoint ({CONFIG_NAME} with moe_format_version and "
                                           f"{WEIGHTS_NAME} only)")


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
    expected = saved_names(model)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint {weights_file} does not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=not config.tie_embeddings)
    if dtype is not None:
        model.to(dtype=dtype)
    return model.to(device)


def run_config_of(checkpoint: Path) -> Optional[dict[str, Any]]:
    """The resolved config (config.yaml) of the training run whose run directory holds `checkpoint`, if any."""
    for parent in list(checkpoint.resolve().parents)[:3]:
        config_file = parent / "config.yaml"
        if config_file.is_file():
            import yaml

            return yaml.safe_load(config_file.read_text())
    return None
