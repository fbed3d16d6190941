"""File names and digests that checkpoints, prepared data and the service share (standard library only)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Union

TOKENIZER_NAME = "tokenizer.json"  # a Hugging Face tokenizers file, in prepared data and in every checkpoint
_CHUNK = 1 << 20


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks (weights files can be large)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()
