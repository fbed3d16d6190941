"""Model checkpoints: safetensors weights plus the JSON model config (never pickle).

A checkpoint is a directory holding `model.safetensors` and `config.json`.
It is written to a temporary sibling directory and renamed into place, so an
interrupted save never leaves a directory that looks complete and never
destroys the checkpoint it replaces until the new one is whole.

`replace_directory` / `write_directory_atomically` are the one atomic swap for
every directory this project writes (checkpoints, Hugging Face exports,
prepared data). Each caller says which existing directory it may replace (one
it wrote itself, recognised by its files); anything else, and any file, is
refused before the write starts, so a mistyped path never deletes a user's data.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from safetensors.torch import load_file, save_file

from moe.config import ModelConfig
from moe.model import MoETransformer

WEIGHTS_NAME = "model.safetensors"
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


class ReplaceRefusedError(ValueError):
    """An existing path that a directory write may not replace; the message names it and why."""

    def __init__(self, target: PathLike, reason: str, label: str = "") -> None:
        super().__init__(f"refusing to replace {label + '=' if label else ''}{target}: {reason}")
        self.target = Path(target)
        self.reason = reason
        self.label = label

    def __reduce__(self):
        # Rebuilt from its fields, so that it crosses a process boundary (Ray) intact.
        return type(self), (self.target, self.reason, self.label)


def check_replaceable(target: Path, *, replaceable: Callable[[Path], bool], kind: str, label: str = "") -> None:
    """Raises `ReplaceRefusedError` unless `target` is absent, an empty directory, or `replaceable(target)`.

    Args:
        target: the path a write would replace.
        replaceable: whether an existing non-empty directory is one this kind of
            write made (and may therefore replace).
        kind: what `replaceable` recognises, for the message ("a moe checkpoint").
        label: the config key that named `target`, for the message.
    """
    if target.is_symlink():
        raise ReplaceRefusedError(target, f"it is a symbolic link (to {os.readlink(target)}); name the directory "
                                  "it points to", label)
    if not target.exists():
        return
    if not target.is_dir():
        raise ReplaceRefusedError(target, f"it is an existing file, not {kind}; a file is never replaced", label)
    if next(target.iterdir(), None) is None or replaceable(target):
        return
    raise ReplaceRefusedError(target, f"it is a non-empty directory that is not {kind}; only {kind} or an "
                              "empty directory is replaced (remove it or choose another path)", label)


def replace_directory(tmp: Path, target: Path, *, replaceable: Callable[[Path], bool], kind: str,
                      label: str = "") -> None:
    """Moves the complete directory `tmp` to `target`, replacing what is there if that may be replaced.

    The old `target` is renamed aside first and removed only after the swap, so
    at every moment either the old or the new directory is in place.

    Args:
        tmp: the finished directory, a sibling of `target`.
        target: where it goes.
        replaceable, kind, label: see `check_replaceable`; checked before anything moves.
    Raises:
        ReplaceRefusedError: `target` is a file, a symbolic link or a
            non-empty directory that `replaceable` does not recognise.
    """
    check_replaceable(target, replaceable=replaceable, kind=kind, label=label)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def write_directory_atomically(directory: Path, write: Callable[[Path], None], *,
                               replaceable: Callable[[Path], bool], kind: str) -> Path:
    """Calls `write(tmp)` on a fresh sibling directory, then swaps it into `directory`.

    `directory` is checked (see `check_replaceable`) before `write` runs, so a
    refused target costs no work. An exception (or a crash) leaves `directory`
    as it was.

    Returns:
        The directory written (the target of a symbolic link, if `directory` is one).
    """
    if directory.is_symlink():
        # Write where the link points: replacing the link would move the data
        # off the volume the user linked to.
        directory = directory.resolve()
    check_replaceable(directory, replaceable=replaceable, kind=kind)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write(tmp)
        replace_directory(tmp, directory, replaceable=replaceable, kind=kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


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
