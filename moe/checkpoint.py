"""Model checkpoints: safetensors weights plus the JSON model config (never pickle).

A checkpoint is a directory holding `model.safetensors` and `config.json`.
A training checkpoint written with `trainer.checkpoint_format=sharded` holds
`model/` instead of `model.safetensors`: a `torch.distributed.checkpoint`
directory (one `.distcp` file per writing rank and a `.metadata` index, every
tensor with its global shape), which `read_weights` reads whole in one
process; `cluster/sharded_checkpoint.py` writes it and loads it sharded.
A model checkpoint is written to a temporary sibling directory and renamed into place, so an
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
SHARDED_WEIGHTS_DIR = "model"  # torch.distributed.checkpoint's layout (trainer.checkpoint_format=sharded)


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
    write_model_config(model_config, directory)
    return [WEIGHTS_NAME, CONFIG_NAME]


def write_model_config(model_config: dict, directory: Path) -> None:
    """config.json: the model config a checkpoint is rebuilt from (either weights layout)."""
    payload = {"moe_format_version": FORMAT_VERSION, "model": model_config}
    (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=2, sort_keys=True))


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
        path: checkpoint directory written by `save_checkpoint` or by training (either weights layout).
        device: where to put the model.
        dtype: optional floating dtype to cast the parameters to.
    Raises:
        FileNotFoundError: missing files. ValueError: weights that do not fit
            the config (names the missing/unexpected tensors).
    """
    path = Path(path)
    config = read_model_config(path)
    state = read_weights(path)
    model = MoETransformer(config)
    expected = saved_names(model)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint {weight_files(path)[0].parent} does not match its config: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=not config.tie_embeddings)
    if dtype is not None:
        model.to(dtype=dtype)
    return model.to(device)


def is_sharded_checkpoint(path: PathLike) -> bool:
    """Whether the weights of the checkpoint directory `path` are `torch.distributed.checkpoint` shards."""
    return (Path(path) / SHARDED_WEIGHTS_DIR / ".metadata").is_file() and not (Path(path) / WEIGHTS_NAME).exists()


def weight_files(path: PathLike) -> list[Path]:
    """The files holding a checkpoint's weights: model.safetensors, or the shards and index of model/.

    Raises:
        FileNotFoundError: neither is there.
    """
    path = Path(path)
    if is_sharded_checkpoint(path):
        return sorted(p for p in (path / SHARDED_WEIGHTS_DIR).iterdir() if p.is_file())
    if not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"not a moe checkpoint: {path / WEIGHTS_NAME} is missing (and no sharded "
                                f"{path / SHARDED_WEIGHTS_DIR}/.metadata either)")
    return [path / WEIGHTS_NAME]


def weights_sha256(path: PathLike) -> str:
    """One sha256 for a checkpoint's weights: the file's, or for shards the digest of their names and digests."""
    from moe.files import file_sha256

    files = weight_files(path)
    if len(files) == 1 and files[0].name == WEIGHTS_NAME:
        return file_sha256(files[0])
    import hashlib

    return hashlib.sha256("".join(f"{f.name}:{file_sha256(f)}\n" for f in files).encode()).hexdigest()


# The names a `torch.distributed.checkpoint` .metadata pickle may refer to: its own dataclasses, and the torch
# values and containers they hold. DCP reads the file with a bare `pickle.load`; `metadata_reader` admits only
# these, so a crafted file cannot run code (the tensors themselves are read with `torch.load(weights_only=True)`).
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                     "torch.distributed.checkpoint.planner", "torch.distributed.checkpoint._extension")
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                     ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}


def metadata_reader(directory: PathLike):
    """A `torch.distributed.checkpoint.FileSystemReader` of `directory` whose .metadata is unpickled with only
    the classes DCP's metadata holds (see _METADATA_MODULES); anything else raises pickle.UnpicklingError."""
    import pickle

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            value = getattr(torch, name, None) if module == "torch" else None
            if (module in _METADATA_MODULES or (module, name) in _METADATA_GLOBALS
                    or isinstance(value, torch.dtype)):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"{Path(directory) / '.metadata'} refers to {module}.{name}, which "
                                         f"a checkpoint index never holds; refusing to load it")

    class _Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            with open(Path(directory) / ".metadata", "rb") as handle:
                metadata = _Unpickler(handle).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _Reader(str(directory))


def sharded_weight_shapes(path: PathLike) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (global shape, dtype)} of every tensor in a sharded checkpoint's model/ index."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = metadata_reader(Path(path) / SHARDED_WEIGHTS_DIR).read_metadata()
    return {name: (tuple(entry.size), entry.properties.dtype)
            for name, entry in metadata.state_dict_metadata.items() if isinstance(entry, TensorStorageMetadata)}


def read_weights(path: PathLike) -> dict[str, torch.Tensor]:
    """The full single-process state dict of a checkpoint directory, whichever layout holds its weights.

    Sharded weights are read in this one process (`no_dist`), every tensor whole: for export, serving and
    `trainer.init_from`; training workers load them sharded (`cluster.sharded_checkpoint`).
    """
    path = Path(path)
    files = weight_files(path)
    if not is_sharded_checkpoint(path):
        return load_file(str(files[0]), device="cpu")
    import torch.distributed.checkpoint as dcp

    state = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in sharded_weight_shapes(path).items()}
    import warnings

    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": yes
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=metadata_reader(path / SHARDED_WEIGHTS_DIR), no_dist=True)
    return state


def run_config_of(checkpoint: Path) -> Optional[dict[str, Any]]:
    """The resolved config (config.yaml) of the training run whose run directory holds `checkpoint`, if any."""
    for parent in list(checkpoint.resolve().parents)[:3]:
        config_file = parent / "config.yaml"
        if config_file.is_file():
            import yaml

            return yaml.safe_load(config_file.read_text())
    return None
