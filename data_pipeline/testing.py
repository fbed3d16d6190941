"""Tiny deterministic corpora for tests and smoke runs (never the real data).

    files = make_corpus(tmp_path / "corpus")        # text files + one JSONL + one Parquet
    prepare(tiny_data_config(tmp_path / "corpus", tmp_path / "prepared"))

Documents differ in length, vocabulary and redundancy, so that every
difficulty metric spreads them out.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

_WORDS = ("the of and to in is was for on that with as by at from his her it an be this are have not but "
          "def return import class self if else while for yield lambda data model expert router token").split()


def _document(rng: random.Random, index: int) -> str:
    num_words = rng.choice([rng.randint(3, 30), rng.randint(30, 150), rng.randint(150, 400)])
    rare_share = rng.choice([0.0, 0.05, 0.3])
    words = []
    for _ in range(num_words):
        if rng.random() < rare_share:
            words.append("".join(rng.choice("qxzjvkwy") for _ in range(rng.randint(3, 9))))
        else:
            # Zipf-like: low indices are much more frequent.
            words.append(_WORDS[min(int(rng.paretovariate(1.2)) - 1, len(_WORDS) - 1)])
    return f"document {index}: " + " ".join(words) + "\n"


def make_corpus(directory: Path, *, num_text: int = 40, num_jsonl: int = 15, num_parquet: int = 10,
                seed: int = 0) -> dict[str, Any]:
    """Writes `num_text` text files, a JSONL file and a Parquet file of documents.

    Returns:
        {"texts": every document's text in reading order (sorted paths, then
        record order), "directory": directory}.
    """
    rng = random.Random(seed)
    directory = Path(directory)
    (directory / "text").mkdir(parents=True, exist_ok=True)
    index = 0
    records = []
    for _ in range(num_jsonl):
        records.append(_document(rng, index))
        index += 1
    rows = []
    for _ in range(num_parquet):
        rows.append(_document(rng, index))
        index += 1
    text_docs = []
    for _ in range(num_text):
        text_docs.append(_document(rng, index))
        index += 1
    (directory / "records.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n"
                                                     for i, t in enumerate(records)))
    pq.write_table(pa.table({"content": rows}), directory / "rows.parquet")
    for i, text in enumerate(text_docs):
        (directory / "text" / f"doc{i:03d}.txt").write_text(text)
    # Reading order: records.jsonl, rows.parquet, text/doc000.txt, ...
    texts = records + rows + text_docs
    return {"texts": texts, "directory": directory}


def tiny_data_config(sources: Any, output: Path, **overrides: Any) -> dict[str, Any]:
    """A `data` config sized for tests: small vocabulary, many small record batches and shards."""
    cfg = {"sources": [str(s) for s in (sources if isinstance(sources, (list, tuple)) else [sources])],
           "output": str(output), "vocab_size": 320, "text_column": "content", "validation_fraction": 0.1,
           "calibration_fraction": 0.1, "record_batch_bytes": 1024, "shard_max_bytes": 8192, "chunk_bytes": 2048}
    cfg.update(overrides)
    return cfg
