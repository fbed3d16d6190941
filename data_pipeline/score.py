"""Stage 3, score: per-document difficulty metrics and their percentiles.

Metrics (higher is harder):
    length       tokens in the document, EOS included (the `n_tokens` column).
    compression  zlib-compressed size / raw size of the document's UTF-8 text:
                 redundant text compresses well and scores low.
    rarity       mean -log p(token) under the corpus unigram distribution.
    perplexity   exp(mean next-token loss) under a reference `moe` checkpoint
                 (only with `data.score_with`).

Each metric is also stored as a percentile: the share (in %) of training
documents whose value is strictly lower. The easiest training document is at
0, so a pace of 0 still has an eligible document, and no value exceeds 100.
"""

from __future__ import annotations

import hashlib
import zlib
from contextlib import contextmanager
from typing import Iterator

import numpy as np

METRIC_COLUMNS = {"length": "n_tokens", "compression": "compression", "rarity": "rarity",
                  "perplexity": "perplexity"}
ZLIB_LEVEL = 6
STAT_PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def percentile_column(metric: str) -> str:
    return f"{metric}_pct"


def compression_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, ZLIB_LEVEL)) / len(raw)


def split_key(text: str) -> int:
    """A 64-bit content hash: which side of the split a document falls on."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def unigram_neglogp(counts: np.ndarray) -> np.ndarray:
    """-log p(token) for every id; ids never seen get the cost of a single occurrence."""
    total = counts.sum()
    return np.log(total) - np.log(np.maximum(counts, 1)).astype(np.float64)


def mean_rarity(values: np.ndarray, offsets: np.ndarray, neglogp: np.ndarray) -> np.ndarray:
    """Mean -log p(token) of each document of a flattened list array (no empty documents)."""
    lengths = np.diff(offsets)
    assert lengths.min() > 0, "every document holds at least its EOS token"
    sums = np.add.reduceat(neglogp[values], offsets[:-1].astype(np.int64))
    return sums / lengths


def percentiles(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """100 * (number of `reference` values strictly below each value) / len(reference)."""
    ordered = np.sort(reference)
    return np.searchsorted(ordered, values, side="left") * (100.0 / len(ordered))


def metric_stats(values: np.ndarray) -> dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    stats = {"min": float(values.min()), "max": float(values.max()), "mean": float(values.mean()),
             "std": float(values.std())}
    for q, v in zip(STAT_PERCENTILES, np.percentile(values, STAT_PERCENTILES)):
        stats[f"p{q}"] = float(v)
    return stats


@contextmanager
def _single_thread() -> Iterator[None]:
    # CPU matmul results depend on how the reduction is split across threads;
    # one thread gives the same bits in every engine and worker.
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class PerplexityScorer:
    """Perplexity of documents under a reference `moe` checkpoint.

    Each document is cut into windows of `seq_len + 1` tokens (stride
    `seq_len`), so every token after the first is predicted once; the windows
    of one document are scored together, never mixed with other documents, so
    a document's score does not depend on how documents are batched.

    Args:
        checkpoint: a directory written by `moe.save_checkpoint`.
        seq_len: window length; capped at the model's `max_seq_len`.
        vocab_size: the data's vocabulary, which the model must cover.
    """

    def __init__(self, checkpoint: str, *, seq_len: int, vocab_size: int,
                 max_windows_per_forward: int = 16) -> None:
        try:
            import moe
        except ImportError as err:  # pragma: no cover - moe ships in the same repository
            raise ImportError("data.score_with needs the `moe` package") from err
        import torch

        self.model = moe.load_checkpoint(checkpoint).eval()
        model_vocab = self.model.config.vocab_size
        if model_vocab < vocab_size:
            raise ValueError(f"data.score_with: checkpoint {checkpoint} has vocab_size {model_vocab}, "
                             f"smaller than the data's {vocab_size}")
        self.seq_len = min(seq_len, self.model.config.max_seq_len)
        self.max_windows_per_forward = max_windows_per_forward
        self._torch = torch

    def score(self, documents: list[np.ndarray]) -> np.ndarray:
        """Returns the perplexity of each token array (documents of one token score nan)."""
        with _single_thread(), self._torch.no_grad():
            return np.array([self._score_one(doc) for doc in documents], dtype=np.float64)

    def _score_one(self, tokens: np.ndarray) -> float:
        torch = self._torch
        tokens_T = torch.from_numpy(tokens.astype(np.int64))
        num_tokens = len(tokens_T)
        if num_tokens < 2:
            return float("nan")
        total_nll, count = 0.0, 0
        window = self.seq_len + 1
        starts = list(range(0, num_tokens - 1, self.seq_len))
        full = [s for s in starts if s + window <= num_tokens]
        partial = [s for s in starts if s + window > num_tokens]
        groups = [full[i:i + self.max_windows_per_forward]
                  for i in range(0, len(full), self.max_windows_per_forward)]
        groups += [[s] for s in partial]
        for group in groups:
            length = min(window, num_tokens - group[0])
            batch_BT = torch.stack([tokens_T[s:s + length] for s in group])
            logits_BTV = self.model(batch_BT[:, :-1]).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits_BTV.reshape(-1, logits_BTV.shape[-1]), batch_BT[:, 1:].reshape(-1), reduction="sum")
            total_nll += float(nll)
            count += batch_BT[:, 1:].numel()
        return float(np.exp(total_nll / count))
