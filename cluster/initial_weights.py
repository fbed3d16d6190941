"""`trainer.init_from`: start a fresh run from another model's weights.

A run normally starts from the seeded initialisation, or resumes its own
checkpoint (weights, optimizer, data position). `init_from` is the third way,
for fine-tuning and for changing a run's layout: the weights come from
  - a moe checkpoint: a `moe.save_checkpoint` directory, or a training
    checkpoint's `step_N` directory written by any engine, expert-parallel
    degree or number of workers (its model files are the full single-process
    model); or
  - a Hugging Face Mixtral directory (`python -m moe.hf export`, or
    transformers' `save_pretrained` with safetensors),
and everything else starts fresh: step 0, new AdamW state, the data from the
beginning. The experiment's model config must fit the weights tensor for
tensor; other settings (balancing coefficients, top-k) may differ and are
listed when the run starts. A run that resumes its own checkpoint ignores
`init_from` (the driver decides, see cluster/launch.py), so `trainer.resume=auto`
after a crash continues the fine-tuning rather than restarting it.

`check_init_from` runs on the driver before Ray starts: it reads the
safetensors headers (meta tensors) and checks a training checkpoint's weights
against their recorded digest; the workers call `read_initial_state`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from moe.checkpoint import (CONFIG_NAME, SHARDED_WEIGHTS_DIR, WEIGHTS_NAME, is_sharded_checkpoint, read_model_config,
                            read_weights, saved_names, sharded_weight_shapes, weight_files)
from moe.config import ModelConfig
from moe.hf import from_hf_config, from_hf_state_dict, hf_weight_files
from moe.model import MoETransformer

from cluster.checkpointing import TRAIN_STATE, read_train_state, recorded_file_problem


def _fail(path: Path, message: str) -> None:
    raise ValueError(f"trainer.init_from: {path}: {message}")


def _kind(path: Path) -> str:
    """"moe" or "hf", from config.json."""
    config_file = path / CONFIG_NAME
    if not path.is_dir():
        _fail(path, "is not a directory")
    if not config_file.is_file():
        _fail(path, f"has no {CONFIG_NAME}; expected a moe checkpoint or a Hugging Face Mixtral directory")
    try:
        payload = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        _fail(path, f"{CONFIG_NAME} is not valid JSON ({err})")
    if isinstance(payload, dict) and "moe_format_version" in payload:
        return "moe"
    if isinstance(payload, dict) and payload.get("model_type") == "mixtral":
        return "hf"
    _fail(path, f"{CONFIG_NAME} is neither a moe checkpoint config (moe_format_version) nor a Hugging Face "
                f"Mixtral config (model_type: mixtral)")
    raise AssertionError  # unreachable


def _weight_files(path: Path, kind: str) -> list[Path]:
    try:
        files = weight_files(path) if kind == "moe" else hf_weight_files(path)
    except FileNotFoundError:
        _fail(path, f"{WEIGHTS_NAME} is missing, and no index of shards either (only safetensors weights are "
                    f"read, never pickled files)")
    for file in files:
        if not file.is_file():
            _fail(path, f"{file.name} is missing (only safetensors weights are read, never pickled files)")
    return files


def _read(path: Path, files: list[Path], shapes_only: bool) -> dict[str, torch.Tensor]:
    """The tensors of safetensors files or of a sharded checkpoint: real ones, or meta tensors of the stored
    shapes (headers, or the sharded index, only)."""
    if is_sharded_checkpoint(path):
        if not shapes_only:
            return read_weights(path)
        return {name: torch.empty(shape, dtype=dtype, device="meta")
                for name, (shape, dtype) in sharded_weight_shapes(path).items()}
    if not shapes_only:
        return {name: t for file in files for name, t in load_file(str(file), device="cpu").items()}
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                state[name] = torch.empty(handle.get_slice(name).get_shape(), device="meta")
    return state


def _check_digest(path: Path) -> None:
    """A training checkpoint's weights against the size and sha256 recorded when they were written."""
    if not (path / TRAIN_STATE).is_file():
        return
    recorded = read_train_state(path).get("files", {})
    for name in sorted(recorded):
        if name == WEIGHTS_NAME or name.startswith(f"{SHARDED_WEIGHTS_DIR}/"):
            problem = recorded_file_problem(path / name, recorded[name])
            if problem:
                _fail(path, f"{problem} ({TRAIN_STATE})")


def _expected_shapes(model_config: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = MoETransformer(model_config)
    names = saved_names(model)
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name in names}


def read_initial_state(path: Path, model_config: ModelConfig, *, shapes_only: bool = False
                       ) -> dict[str, torch.Tensor]:
    """The weights at `path` as a full single-process state dict for a model of `model_config`.

    Args:
        shapes_only: meta tensors from the file headers (validation without reading the weights).
    Returns:
        Every tensor a checkpoint of `model_config` holds (`moe.checkpoint.saved_names`); for a
        Mixtral directory the routers' `expert_bias` are zeros (Mixtral routes without one).
    Raises:
        ValueError naming the path and the first mismatched, missing or unexpected tensors.
    """
    path = Path(path)
    kind = _kind(path)
    files = _weight_files(path, kind)
    expected = _expected_shapes(model_config)
    state = _read(path, files, shapes_only)
    if kind == "hf":
        try:
            state = from_hf_state_dict(state, model_config)
        except ValueError as err:
            _fail(path, f"does not fit this run's model config: {err}")
        for name, shape in expected.items():
            if name.endswith("router.expert_bias"):
                state[name] = torch.zeros(shape, device="meta" if shapes_only else "cpu")
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    misshapen = [f"{name} {tuple(state[name].shape)} vs {expected[name]}"
                 for name in sorted(expected.keys() & state.keys()) if tuple(state[name].shape) != expected[name]]
    if missing or unexpected or misshapen:
        _fail(path, f"does not fit this run's model config (checkpoint vs model): shapes {misshapen[:3]}, "
                    f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return state


def config_differences(path: Path, model_config: ModelConfig) -> list[str]:
    """The model settings in which the weights' own config differs from this run's, as "key: theirs -> ours"."""
    path = Path(path)
    if _kind(path) == "moe":
        theirs = read_model_config(path)
    else:
        theirs = from_hf_config(json.loads((path / CONFIG_NAME).read_text()), backend=model_config.experts.backend)
    return [f"{key}: {a!r} -> {b!r}" for key, (a, b) in _flat_diff(theirs.to_dict(), model_config.to_dict()).items()]


def _flat_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    out = {}
    for key in sorted(a.keys() | b.keys()):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out.update(_flat_diff(x, y, f"{prefix}{key}."))
        elif x != y:
            out[prefix + key] = (x, y)
    return out


def check_init_from(init_from: str, model_config: ModelConfig) -> Path:
    """Validates trainer.init_from on the driver (the headers, and a training checkpoint's recorded digest)
    and returns the absolute path."""
    path = Path(init_from).expanduser().resolve()
    read_initial_state(path, model_config, shapes_only=True)
    _check_digest(path)
    return path
