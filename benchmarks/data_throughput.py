"""Tokens per second of packed, curriculum-ordered batches on one core, beside a naive baseline.

    python benchmarks/data_throughput.py                       # the default corpus (Python stdlib)
    python benchmarks/data_throughput.py --data-dir data/mine --seq-len 2048 --batch-size 16

Measured in one process pinned to one core (torch and numpy on one thread):
  loader               CurriculumLoader, fixed_linear pacing on `length` (the
                       curriculum ends halfway through the measured batches),
                       prefetch=0: all the work on the measuring thread.
  loader+prefetch      the same with the background prefetch thread (same core).
  naive JSONL          the same training documents read from a JSONL file of
                       token lists with json.loads, packed with Python lists
                       and turned into tensors with torch.tensor.
Prints a table and one line of JSON. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import torch

from data_pipeline.loader import CurriculumLoader
from data_pipeline.manifest import read_manifest
from data_pipeline.prepare import ensure_prepared


def measure_loader(data_dir: Path, *, seq_len: int, batch_size: int, num_batches: int, prefetch: int) -> dict:
    loader = CurriculumLoader(data_dir, seq_len=seq_len, global_batch_size=batch_size, prefetch=prefetch,
                              schedule="fixed_linear", metric="length", total_curriculum_step=num_batches // 2,
                              min_difficulty=10)
    batches = iter(loader)
    for _ in range(3):  # warm-up: page in the first blocks, start the thread
        next(batches)
    start = time.perf_counter()
    for _ in range(num_batches):
        batch = next(batches)
    seconds = time.perf_counter() - start
    assert batch["input_ids"].shape == (batch_size, seq_len)
    loader.close()
    return {"tokens": num_batches * batch_size * seq_len, "seconds": seconds}


def write_jsonl(data_dir: Path, path: Path) -> int:
    """The training documents as JSON lines of token lists; returns the token count."""
    manifest = read_manifest(data_dir)
    num_tokens = 0
    with open(path, "w") as handle:
        for shard in manifest["splits"]["train"]["shards"]:
            with pa.memory_map(str(data_dir / shard["file"])) as source:
                for batch in ipc.open_stream(source):
                    for doc_id, tokens in zip(batch.column("doc_id").to_pylist(), batch.column("tokens").to_pylist()):
                        handle.write(json.dumps({"doc_id": doc_id, "tokens": tokens}) + "\n")
                        num_tokens += len(tokens)
    return num_tokens


def measure_naive(jsonl: Path, *, seq_len: int, batch_size: int, num_batches: int) -> dict:
    """Plain Python: json.loads each line, extend a list, cut sequences, torch.tensor."""
    tokens_per_batch = batch_size * seq_len
    start = time.perf_counter()
    produced = 0
    token_buffer: list[int] = []
    doc_buffer: list[int] = []
    with open(jsonl) as handle:
        for line in handle:
            record = json.loads(line)
            token_buffer.extend(record["tokens"])
            doc_buffer.extend([record["doc_id"]] * len(record["tokens"]))
            while len(token_buffer) > tokens_per_batch and produced < num_batches:
                rows = [token_buffer[i * seq_len:i * seq_len + seq_len + 1] for i in range(batch_size)]
                batch = {"input_ids": torch.tensor([r[:-1] for r in rows]),
                         "targets": torch.tensor([r[1:] for r in rows]),
                         "doc_ids": torch.tensor([doc_buffer[i * seq_len:(i + 1) * seq_len]
                                                  for i in range(batch_size)])}
                del token_buffer[:tokens_per_batch], doc_buffer[:tokens_per_batch]
                produced += 1
            if produced == num_batches:
                break
    seconds = time.perf_counter() - start
    assert batch["input_ids"].shape == (batch_size, seq_len)
    return {"tokens": produced * tokens_per_batch, "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="a prepared directory (default: prepare the stdlib corpus into data/bench-stdlib)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-batches", type=int, default=1000)
    parser.add_argument("--naive-batches", type=int, default=100)
    parser.add_argument("--cpu", type=int, default=None, help="core to pin to (default: the first allowed one)")
    args = parser.parse_args(argv)

    cpu = args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)

    data_dir = args.data_dir
    if data_dir is None:
        data_dir = ensure_prepared({"sources": [], "output": "data/bench-stdlib"})
    geometry = dict(seq_len=args.seq_len, batch_size=args.batch_size)
    results = {
        "loader": measure_loader(data_dir, num_batches=args.num_batches, prefetch=0, **geometry),
        "loader+prefetch": measure_loader(data_dir, num_batches=args.num_batches, prefetch=2, **geometry),
    }
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "train.jsonl"
        write_jsonl(data_dir, jsonl)
        results["naive JSONL"] = measure_naive(jsonl, num_batches=args.naive_batches, **geometry)
    for result in results.values():
        result["tokens_per_s"] = result["tokens"] / result["seconds"]
    naive = results["naive JSONL"]["tokens_per_s"]
    for result in results.values():
        result["vs_naive"] = result["tokens_per_s"] / naive

    manifest = read_manifest(data_dir)
    print(f"data: {data_dir} ({manifest['num_tokens']:,} tokens, {manifest['num_documents']} documents); "
          f"batches of {args.batch_size} x {args.seq_len}; pinned to cpu {cpu}")
    print(f"{'pipeline':<18}{'tokens':>14}{'seconds':>10}{'tokens/s':>16}{'vs naive':>10}")
    for name, result in results.items():
        print(f"{name:<18}{result['tokens']:>14,}{result['seconds']:>10.3f}{result['tokens_per_s']:>16,.0f}"
              f"{result['vs_naive']:>9.1f}x")
    print(json.dumps({"data_dir": str(data_dir), "seq_len": args.seq_len, "batch_size": args.batch_size,
                      "cpu": cpu, "results": results}, sort_keys=True))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
