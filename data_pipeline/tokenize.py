"""Stage 2, tokenize: a byte-level BPE (Hugging Face `tokenizers`) and the token arrays.

The tokenizer is either trained on the corpus (`train_tokenizer`) or loaded
from an existing `tokenizer.json` (`load_tokenizer_file`). Every document is
encoded and followed by the EOS token. Tokens are stored in the narrowest
unsigned integer type that holds the vocabulary (`token_dtype`).

A prepared directory keeps its `tokenizer.json` and the file's SHA-256 in the
manifest; `load_tokenizer(data_dir)` refuses a tokenizer that does not match.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Union

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TOKENIZER_FILE = "tokenizer.json"

PathLike = Union[str, Path]


class TokenizerMismatchError(ValueError):
    """The tokenizer file is not the one the data was tokenized with."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer type that holds ids in [0, vocab_size)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32")


def train_tokenizer(texts: Iterable[str], *, vocab_size: int, eos_token: str) -> Tokenizer:
    """Trains a byte-level BPE with `eos_token` as its only special token (id 0).

    Training is deterministic for the same texts in the same order.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def load_tokenizer_file(path: PathLike, *, eos_token: str) -> Tokenizer:
    """Loads a Hugging Face `tokenizer.json` and checks that it knows `eos_token`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.tokenizer: no such tokenizer file: {path}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on a bad file
        raise ValueError(f"data.tokenizer: {path} is not a Hugging Face tokenizer.json ({err})") from err
    if tokenizer.token_to_id(eos_token) is None:
        raise ValueError(f"data.tokenizer: {path} has no token data.eos_token={eos_token!r}")
    return tokenizer


def file_sha256(path: PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_tokenizer(data_dir: PathLike) -> Tokenizer:
    """Loads the tokenizer of a prepared directory, checking it against the manifest.

    Args:
        data_dir: a directory written by `data_pipeline.prepare.prepare`.
    Returns:
        The tokenizer the shards were encoded with.
    Raises:
        TokenizerMismatchError: `tokenizer.json` differs from the one recorded
            in `manifest.json`.
    """
    from data_pipeline.manifest import read_manifest

    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    path = data_dir / TOKENIZER_FILE
    check_tokenizer_hash(path, manifest["tokenizer"]["sha256"])
    return Tokenizer.from_file(str(path))


def check_tokenizer_hash(path: Path, expected_sha256: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the prepared directory is incomplete")
    actual = file_sha256(path)
    if actual != expected_sha256:
        raise TokenizerMismatchError(
            f"{path} has SHA-256 {actual[:16]}..., but the manifest records {expected_sha256[:16]}...: "
            "the shards were tokenized with a different tokenizer; prepare the data again")


def encode_documents(tokenizer: Tokenizer, texts: list[str], *, eos_id: int,
                     dtype: np.dtype) -> pa.ListArray:
    """Encodes `texts` (EOS appended to each) into one Arrow list array of `dtype` ids.

    Text that spells a special token (say a file that mentions "<|endoftext|>")
    is encoded as plain text, so EOS only ever marks a document boundary.
    """
    tokenizer.encode_special_tokens = True
    encodings = tokenizer.encode_batch_fast(texts) if hasattr(tokenizer, "encode_batch_fast") \
        else tokenizer.encode_batch(texts)
    lengths = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(encodings))
    offsets = np.zeros(len(encodings) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.empty(int(offsets[-1]), dtype=dtype)
    for i, encoding in enumerate(encodings):
        start, end = offsets[i], offsets[i + 1]
        values[start:end - 1] = encoding.ids
        values[end - 1] = eos_id
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
