"""The `manifest.json` of a prepared directory: what is in it and how it was made.

Keys (all written by `prepare`, in sorted order, without timestamps so that the
same input gives the same bytes):
    pipeline_version  bumps when the shard layout or the metrics change.
    fingerprint       hash of everything the output depends on (sources with
                      sizes and mtimes, tokenizer, scoring, split, shard sizes);
                      `ensure_prepared` re-prepares when it differs.
    tokenizer         file, sha256, vocab_size, eos_token, eos_id, trained, and
                      the bytes of text the BPE was trained on.
    vocab_size, token_dtype
    num_documents, num_tokens
    splits            per split: documents, tokens and its shards; each shard
                      lists its record batches (byte offset, length, rows,
                      crc32) so that the loader can verify and seek them.
    split             how validation and calibration documents were chosen.
    metrics           per metric: its column, percentile column and statistics.
    read              undecodable bytes replaced, empty documents and skipped
                      records while reading the sources.
    sources           the resolved source files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

MANIFEST_FILE = "manifest.json"
PIPELINE_VERSION = 2  # 2: the calibration split

PathLike = Union[str, Path]


class ManifestError(ValueError):
    """A prepared directory whose manifest is missing, unreadable or of another version."""


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def read_manifest(directory: PathLike) -> dict[str, Any]:
    """Reads and checks the manifest of a prepared directory.

    Raises:
        ManifestError: no manifest, invalid JSON, or another pipeline version.
    """
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{path} is missing: {directory} is not a prepared data directory "
                            "(run `python -m data_pipeline.prepare`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path} is not valid JSON ({err})") from err
    version = manifest.get("pipeline_version") if isinstance(manifest, dict) else None
    if version != PIPELINE_VERSION:
        raise ManifestError(f"{path} has pipeline_version {version!r}, this code reads {PIPELINE_VERSION}: "
                            "prepare the data again")
    return manifest
