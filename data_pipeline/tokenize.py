"""Stage 2, tokenize: a byte-level BPE (Hugging Face `tokenizers`) and the token arrays.

The tokenizer is either trained on the corpus (`train_tokenizer`) or loaded
from an existing `tokenizer.json` (`load_tokenizer_file`). Every document is
encoded and followed by the EOS token. Tokens are stored in the narrowest
unsigned integer type that holds the vocabulary (`token_dtype`).

A prepared directory keeps its `tokenizer.json` and the file's SHA-256 in the
manifest; `load_tokenizer(data_dir)` refuses a tokenizer that does not match.

NOTE: long documents. The tokenizer's memory grows with the length of one
input (a single 40 MB line took about 6 GB), so text is encoded, and the
BPE trained, in pieces of at most `MAX_PIECE_CHARS` (`split_long_text`), and
encoded in batches of at most `ENCODE_BATCH_CHARS`; a document's token ids are
the concatenation of its pieces' ids. A piece ends before a space or newline
that stands between two non-space characters: byte-level pre-tokenization
never joins text across such a point, so for the byte-level BPE trained here
the ids equal those of the whole document. Only a document with no such point
in the last half of a piece is cut mid-word. The cuts depend on the text alone,
so the output stays deterministic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moe.files import TOKENIZER_NAME, file_sha256  # noqa: F401 (file_sha256 re-exported)

TOKENIZER_FILE = TOKENIZER_NAME
MAX_PIECE_CHARS = 1 << 20
ENCODE_BATCH_CHARS = 4 << 20

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


def split_long_text(text: str, max_chars: Optional[int] = None) -> Iterator[str]:
    """Yields consecutive pieces of `text`, each at most `max_chars` (default `MAX_PIECE_CHARS`) long.

    See the NOTE above for where the cuts fall.
    """
    max_chars = MAX_PIECE_CHARS if max_chars is None else max_chars
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = _cut_point(text, start + max_chars // 2, end)
        yield text[start:cut]
        start = cut
    yield text[start:] if start else text


def _cut_point(text: str, lo: int, hi: int) -> int:
    """The last i in (lo, hi] with text[i] a space or newline between two non-space characters, else hi."""
    for separator in (" ", "\n"):
        i = hi + 1
        while True:
            i = text.rfind(separator, lo + 1, i)
            if i < 0:
                break
            if not text[i - 1].isspace() and i + 1 < len(text) and not text[i + 1].isspace():
                return i
    return hi


def encode_documents(tokenizer: Tokenizer, texts: list[str], *, eos_id: int,
                     dtype: np.dtype) -> pa.ListArray:
    """Encodes `texts` (EOS appended to each) into one Arrow list array of `dtype` ids.

    Text that spells a special token (say a file that mentions "<|endoftext|>")
    is encoded as plain text, so EOS only ever marks a document boundary. Long
    texts are encoded in pieces, and at most `ENCODE_BATCH_CHARS` at a time, so
    memory stays bounded whatever the length of one document.
    """
    tokenizer.encode_special_tokens = True
    encode = tokenizer.encode_batch_fast if hasattr(tokenizer, "encode_batch_fast") else tokenizer.encode_batch
    ids: list[list[np.ndarray]] = [[] for _ in texts]
    batch: list[tuple[int, str]] = []
    batch_chars = 0

    def flush() -> None:
        for (index, _), encoding in zip(batch, encode([piece for _, piece in batch])):
            ids[index].append(np.asarray(encoding.ids, dtype=dtype))
        batch.clear()

    for index, text in enumerate(texts):
        for piece in split_long_text(text):
            if batch and batch_chars + len(piece) > ENCODE_BATCH_CHARS:
                flush()
                batch_chars = 0
            batch.append((index, piece))
            batch_chars += len(piece)
    flush()
    eos = np.array([eos_id], dtype=dtype)
    lengths = np.fromiter((sum(len(part) for part in parts) + 1 for parts in ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate([array for parts in ids for array in (*parts, eos)]) if ids else np.empty(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
