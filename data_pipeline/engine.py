"""Where tokenization and per-document scoring run: in this process, or on Ray Data.

Both engines apply the same function, `process_chunk`, to the same chunks of
documents and hand back the results in chunk order, so the prepared output is
identical byte for byte whichever engine made it. A chunk's result depends on
nothing but its documents: the tokenizer is deterministic, compression and the
split key are per document, and perplexity is computed one document at a time
on one thread.
"""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from data_pipeline.score import PerplexityScorer, compression_ratio, split_key
from data_pipeline.tokenize import encode_documents, token_dtype

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=2)
def _tokenizer(tokenizer_json: str) -> Tokenizer:
    return Tokenizer.from_str(tokenizer_json)


@functools.lru_cache(maxsize=1)
def _scorer(checkpoint: str, seq_len: int, vocab_size: int) -> PerplexityScorer:
    return PerplexityScorer(checkpoint, seq_len=seq_len, vocab_size=vocab_size)


def process_chunk(chunk: pa.Table, *, tokenizer_json: str, eos_id: int, vocab_size: int,
                  score_with: Optional[str] = None, score_seq_len: int = 256) -> pa.Table:
    """Tokenizes and scores one chunk of documents.

    Args:
        chunk: columns `doc_id`, `source`, `text`.
        tokenizer_json: the serialized tokenizer.
        eos_id: appended to every document.
        vocab_size: picks the token type.
        score_with: optional `moe` checkpoint for the perplexity metric.
        score_seq_len: its scoring window.
    Returns:
        Columns `doc_id`, `source`, `tokens`, `n_tokens`, `compression`,
        `split_key` and, with `score_with`, `perplexity`.
    """
    texts = chunk.column("text").to_pylist()
    tokens = encode_documents(_tokenizer(tokenizer_json), texts, eos_id=eos_id, dtype=token_dtype(vocab_size))
    columns = {
        "doc_id": chunk.column("doc_id"),
        "source": chunk.column("source"),
        "tokens": tokens,
        "n_tokens": pa.array(np.diff(tokens.offsets.to_numpy()).astype(np.int32)),
        "compression": pa.array(np.array([compression_ratio(t) for t in texts], dtype=np.float32)),
        "split_key": pa.array(np.array([split_key(t) for t in texts], dtype=np.uint64)),
    }
    if score_with is not None:
        scorer = _scorer(score_with, score_seq_len, vocab_size)
        offsets = tokens.offsets.to_numpy()
        values = tokens.values.to_numpy()
        documents = [values[offsets[i]:offsets[i + 1]] for i in range(len(texts))]
        columns["perplexity"] = pa.array(scorer.score(documents).astype(np.float32))
    return pa.table(columns)


class LocalEngine:
    """Runs `process_chunk` in this process, one chunk after another."""

    def map_chunks(self, chunks: Iterable[pa.Table], **kwargs: Any) -> Iterator[pa.Table]:
        for chunk in chunks:
            yield process_chunk(chunk, **kwargs)

    def close(self) -> None:
        pass


class RayEngine:
    """Runs `process_chunk` as Ray Data tasks across the cluster.

    Chunks are sent in waves of `wave_size` so that the driver never holds
    more than a wave of raw text; results come back in input order
    (`preserve_order`), which keeps the output deterministic.

    Args:
        address: cluster address for `ray.init`; None joins the running
            Ray instance or starts a local one.
        wave_size: chunks per Ray Data job.
    """

    def __init__(self, address: Optional[str] = None, wave_size: int = 64) -> None:
        import ray

        self._started_ray = False
        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False, include_dashboard=False)
            self._started_ray = True
        self.wave_size = wave_size

    def map_chunks(self, chunks: Iterable[pa.Table], **kwargs: Any) -> Iterator[pa.Table]:
        wave: list[pa.Table] = []
        for chunk in chunks:
            wave.append(chunk)
            if len(wave) == self.wave_size:
                yield from self._run_wave(wave, kwargs)
                wave = []
        if wave:
            yield from self._run_wave(wave, kwargs)

    def _run_wave(self, wave: list[pa.Table], kwargs: dict[str, Any]) -> Iterator[pa.Table]:
        import ray.data

        with _ordered_ray_data():
            dataset = ray.data.from_arrow(wave).map_batches(
                process_chunk, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=None)
            for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                if table.num_rows:
                    yield table

    def close(self) -> None:
        if self._started_ray:
            import ray

            ray.shutdown()


@contextmanager
def _ordered_ray_data() -> Iterator[None]:
    import ray.data

    context = ray.data.DataContext.get_current()
    previous = (context.execution_options.preserve_order, context.enable_progress_bars)
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    try:
        yield
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = previous


def make_engine(name: str, *, ray_address: Optional[str] = None):
    if name == "local":
        return LocalEngine()
    if name == "ray":
        return RayEngine(address=ray_address)
    raise ValueError(f"DataConfig.engine must be 'local' or 'ray', got {name!r}")
