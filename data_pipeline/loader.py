"""Stage 7, loader: curriculum-ordered packed batches for one data-parallel rank.

    loader = CurriculumLoader("data/prepared", seq_len=512, global_batch_size=64, rank=r, world_size=w,
                              schedule="fixed_linear", metric="length", total_curriculum_step=2000)
    for batch in loader:      # {"input_ids", "targets", "doc_ids"}: int64 (64 // w, 512)
        ...
        checkpoint["data"] = loader.state_dict()

Elastic determinism: every rank plans the same global batches from (seed,
step) alone (see curriculum.py and pack.py) and copies out rows
[rank * B, (rank + 1) * B) of each, so the union over ranks is the same for
any world size, and a state saved with one world size resumes with another.

The shards are memory-mapped and verified (size, checksums, structure) when
the loader is built; a corrupt shard raises `ShardError` naming the shard and
the record batch, or with on_corrupt="skip" is left out, logged and listed in
`skipped_shards`. A background thread prepares `prefetch` batches ahead; the
state returned by `state_dict()` is always that of the batches consumed.

Legend: B = local batch, L = seq_len, N = B * L + 1 (the tokens of a rank's batch).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch

from data_pipeline.config import SPLITS, CurriculumConfig, DataConfig
from data_pipeline.curriculum import DocumentStream, ShuffleBuffer, pace
from data_pipeline.manifest import PIPELINE_VERSION, read_manifest
from data_pipeline.pack import Packer, materialize
from data_pipeline.score import percentile_column
from data_pipeline.shards import MappedShard, ShardError, shard_schema
from data_pipeline.tokenize import TOKENIZER_FILE, check_tokenizer_hash

log = logging.getLogger(__name__)

STATE_VERSION = 1
Batch = dict[str, torch.Tensor]


class CurriculumLoader:
    """Streams packed, curriculum-paced batches of a prepared directory.

    Args:
        data_dir: a directory written by `data_pipeline.prepare.prepare`.
        seq_len: L; each sequence is L + 1 tokens (inputs and shifted targets).
        global_batch_size: sequences per step across all ranks.
        rank, world_size: this rank's share is rows [rank*B, (rank+1)*B) with
            B = global_batch_size / world_size.
        seed: shuffle seed.
        schedule, metric, total_curriculum_step, min_difficulty,
            difficulty_step, root_degree, difficulty, max_step: the curriculum,
            with DeepSpeed's names (see `CurriculumConfig`).
        split: `train` (endless, shuffled, paced) or `validation` (one pass
            in manifest order, the same every time it is iterated).
        on_corrupt: `error` or `skip` for corrupt shards.
        prefetch: batches prepared ahead in a background thread (0: none).
        shuffle_buffer: documents in the shuffle buffer.
        verify_checksums: crc32 every record batch at construction.
    """

    def __init__(self, data_dir: Union[str, Path], *, seq_len: int, global_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, schedule: str = "none", metric: str = "length",
                 total_curriculum_step: int = 1000, min_difficulty: float = 10.0, difficulty_step: int = 1,
                 root_degree: int = 2, difficulty: Optional[list[float]] = None,
                 max_step: Optional[list[int]] = None, split: str = "train", on_corrupt: str = "error",
                 prefetch: int = 2, shuffle_buffer: int = 1024, verify_checksums: bool = True) -> None:
        for name, value in (("seq_len", seq_len), ("global_batch_size", global_batch_size),
                            ("world_size", world_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"CurriculumLoader.{name} must be a positive integer, got {value!r}")
        if global_batch_size % world_size:
            raise ValueError(f"CurriculumLoader.global_batch_size ({global_batch_size}) must be divisible by "
                             f"world_size ({world_size})")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"CurriculumLoader.rank must be in [0, {world_size}), got {rank!r}")
        if split not in SPLITS:
            raise ValueError(f"CurriculumLoader.split must be one of {list(SPLITS)}, got {split!r}")
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"CurriculumLoader.on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
        if not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"CurriculumLoader.prefetch must be a non-negative integer, got {prefetch!r}")
        if not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ValueError(f"CurriculumLoader.shuffle_buffer must be a non-negative integer, got {shuffle_buffer!r}")
        curriculum_args = {"schedule": schedule, "metric": metric, "total_curriculum_step": total_curriculum_step,
                           "min_difficulty": min_difficulty, "difficulty_step": difficulty_step,
                           "root_degree": root_degree}
        if difficulty is not None:
            curriculum_args["difficulty"] = list(difficulty)
        if max_step is not None:
            curriculum_args["max_step"] = list(max_step)
        self.curriculum = CurriculumConfig(**curriculum_args)

        self.data_dir = Path(data_dir)
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.split = split
        self.prefetch = prefetch
        self.shuffle_buffer = shuffle_buffer if split == "train" else 0
        self.manifest = read_manifest(self.data_dir)
        self.vocab_size: int = self.manifest["vocab_size"]
        check_tokenizer_hash(self.data_dir / TOKENIZER_FILE, self.manifest["tokenizer"]["sha256"])

        metrics = list(self.manifest["metrics"])
        paced = split == "train" and self.curriculum.schedule != "none"
        if paced and self.curriculum.metric not in metrics:
            raise ValueError(f"CurriculumLoader.metric={self.curriculum.metric!r} is not in {self.data_dir} "
                             f"(it has {sorted(metrics)}; perplexity needs data.score_with)")
        self._difficulty_column = percentile_column(self.curriculum.metric) if paced else None
        self.shards, self.skipped_shards = open_split_shards(self.data_dir, self.manifest, split,
                                                             on_corrupt=on_corrupt,
                                                             verify_checksums=verify_checksums)
        self._blocks = [(i, b) for i, shard in enumerate(self.shards)
                        for b in range(len(shard.entry["record_batches"]))]
        self.num_batches: Optional[int] = None
        if split == "validation":
            num_tokens = sum(shard.entry["num_tokens"] for shard in self.shards)
            num_documents = sum(shard.entry["num_documents"] for shard in self.shards)
            self.num_batches = num_validation_batches(num_tokens, seq_len=seq_len,
                                                      global_batch_size=global_batch_size)
            if self.num_batches == 0:
                raise ValueError(validation_too_small_message(
                    self.data_dir, self.manifest, num_tokens, num_documents, seq_len=seq_len,
                    global_batch_size=global_batch_size))

        self._state = self._initial_state(step=0)
        self._producer: Optional[_Producer] = None
        self._thread: Optional[_PrefetchThread] = None

    @classmethod
    def from_config(cls, cfg: Any, *, global_batch_size: int, rank: int = 0, world_size: int = 1,
                    split: str = "train", data_dir: Optional[Union[str, Path]] = None,
                    **overrides: Any) -> "CurriculumLoader":
        """Builds a loader from the `data` config (seq_len, seed, curriculum, buffers)."""
        cfg = DataConfig.from_any(cfg)
        curriculum = cfg.curriculum
        kwargs = dict(seq_len=cfg.seq_len, global_batch_size=global_batch_size, rank=rank, world_size=world_size,
                      seed=cfg.seed, schedule=curriculum.schedule, metric=curriculum.metric,
                      total_curriculum_step=curriculum.total_curriculum_step,
                      min_difficulty=curriculum.min_difficulty, difficulty_step=curriculum.difficulty_step,
                      root_degree=curriculum.root_degree, difficulty=curriculum.difficulty,
                      max_step=curriculum.max_step, split=split, on_corrupt=cfg.on_corrupt,
                      prefetch=cfg.prefetch, shuffle_buffer=cfg.shuffle_buffer)
        kwargs.update(overrides)
        return cls(data_dir if data_dir is not None else cfg.output, **kwargs)

    # ----------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[Batch]:
        if self.split == "validation":
            return self._validation_batches()
        return self._train_batches()

    def _train_batches(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def next_batch(self) -> Batch:
        """The next training batch (the step counter advances by one)."""
        if self.split != "train":
            raise RuntimeError("next_batch() streams the train split; iterate a validation loader instead")
        if self.prefetch == 0:
            if self._producer is None:
                self._producer = _Producer(self, self._state)
            batch = self._producer.produce()
            self._state = None  # the producer is the state; state_dict() snapshots it
            return batch
        if self._thread is None:
            self._thread = _PrefetchThread(_Producer(self, self._state), self.prefetch)
        batch, self._state = self._thread.get()
        return batch

    def _validation_batches(self) -> Iterator[Batch]:
        producer = _Producer(self, self._initial_state(step=0))
        for _ in range(self.num_batches):
            yield producer.produce()

    # -------------------------------------------------------------------- state

    @property
    def step(self) -> int:
        """The training step of the next batch (batches consumed so far, or as set by `set_step`)."""
        return self._producer.step if self._state is None else self._state["step"]

    @property
    def pace(self) -> float:
        """The curriculum pace (highest eligible percentile) of the next batch."""
        return pace(self.step, self.curriculum) if self._difficulty_column else 100.0

    def set_step(self, step: int) -> None:
        """Makes the next batch count as training step `step` (for pacing); the stream position is kept."""
        state = self._current_state()
        state["step"] = int(step)
        self._restart(state)

    def state_dict(self) -> dict[str, Any]:
        """The position of the stream after the batches consumed so far (plain Python types)."""
        return _plain_state(self._current_state())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resumes from `state_dict()` output; the next batches are those an uninterrupted run yields.

        The state is global: it may come from a run with another world size.
        Raises:
            ValueError: a state of another dataset, seed, batch geometry or curriculum.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        saved, expected = state["fingerprint"], self._fingerprint()
        differing = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
        if differing == ["usable_shards"] and self.skipped_shards:
            # A shard went bad since the state was saved: the exact stream is gone,
            # so keep the step (and the pace) and start a fresh pass.
            log.warning("the usable shards differ from the saved loader state; restarting the stream at "
                        "step %d", state["step"])
            fresh = self._initial_state(step=state["step"])
            fresh["stream"] = [state["stream"][0] + 1, 0, 0]
            self._restart(fresh)
            return
        if differing:
            raise ValueError(f"the loader state does not match this loader: {', '.join(differing)} differ "
                             f"(saved {[saved.get(k) for k in differing]}, now {[expected.get(k) for k in differing]})")
        self._restart(_plain_state(state))

    def close(self) -> None:
        """Stops the prefetch thread (iteration can resume later from the same position)."""
        self._restart(self._current_state())

    def __del__(self) -> None:
        thread = getattr(self, "_thread", None)
        if thread is not None:
            thread.stop()

    def _current_state(self) -> dict[str, Any]:
        """The consumed position; may share immutable parts with the producer (see `_Producer.snapshot`)."""
        if self._state is None:
            return self._producer.snapshot()
        return dict(self._state)

    def _restart(self, state: dict[str, Any]) -> None:
        if self._thread is not None:
            self._thread.stop()
            self._thread = None
        self._producer = None
        self._state = state

    def _initial_state(self, step: int) -> dict[str, Any]:
        return {"version": STATE_VERSION, "fingerprint": self._fingerprint(), "step": step, "stream": [0, 0, 0],
                "buffer": [], "draws": 0, "carry": None}

    def _fingerprint(self) -> dict[str, Any]:
        curriculum = dataclasses.asdict(self.curriculum) if self._difficulty_column else "none"
        return {"dataset": self.manifest["fingerprint"], "split": self.split, "seed": self.seed,
                "seq_len": self.seq_len, "global_batch_size": self.global_batch_size,
                "shuffle_buffer": self.shuffle_buffer, "curriculum": curriculum,
                "usable_shards": [shard.path.name for shard in self.shards]}

def num_validation_batches(num_tokens: int, *, seq_len: int, global_batch_size: int) -> int:
    """Global batches in one pass over a validation split of `num_tokens` tokens.

    Batch t covers packed tokens [t*G*L, (t+1)*G*L + 1) (see pack.py), so a
    batch needs G*L + 1 tokens and every further batch G*L more.
    """
    return max(0, (num_tokens - 1) // (seq_len * global_batch_size))


def validation_too_small_message(data_dir: Path, manifest: dict[str, Any], num_tokens: int, num_documents: int,
                                 *, seq_len: int, global_batch_size: int) -> str:
    """The one-line explanation of a validation split that cannot fill one global batch."""
    return (f"the validation split of {data_dir} has {num_tokens} tokens in {num_documents} documents, "
            f"{max(0, num_tokens - 1) // seq_len} sequences of seq_len {seq_len}; one global batch needs "
            f"{global_batch_size} sequences ({global_batch_size * seq_len + 1} tokens): raise "
            f"data.validation_fraction (prepared with {manifest['split']['validation_fraction']}), or lower "
            "the global batch size or data.seq_len")


def open_split_shards(data_dir: Path, manifest: dict[str, Any], split: str, *, on_corrupt: str,
                      verify_checksums: bool = True) -> tuple[list[MappedShard], list[dict[str, Any]]]:
    """Memory-maps and verifies the shards of one split.

    Args:
        data_dir: the prepared directory.
        manifest: its manifest (`read_manifest`).
        split: one of SPLITS (`train`, `validation`, `calibration`).
        on_corrupt: `error` raises the first `ShardError`; `skip` logs a
            warning for each damaged shard and leaves it out.
        verify_checksums: crc32 every record batch.
    Returns:
        (the usable shards, one entry per skipped shard: shard, record_batch, reason).
    Raises:
        ShardError: a damaged shard with on_corrupt=error.
        ValueError: the split is empty, or no shard of it is usable.
    """
    if not manifest["splits"][split]["shards"]:
        key = f"{split}_fraction" if split != "train" else "validation_fraction"
        raise ValueError(f"the {split} split of {data_dir} is empty (it was prepared with "
                         f"data.{key}={manifest['split'][key]} from {manifest['num_documents']} documents)")
    schema = shard_schema(np.dtype(manifest["token_dtype"]), list(manifest["metrics"]), PIPELINE_VERSION)
    shards, skipped = [], []
    for entry in manifest["splits"][split]["shards"]:
        path = data_dir / entry["file"]
        try:
            shard = MappedShard(path, entry, schema)
            shard.verify(check_crc=verify_checksums)
        except ShardError as err:
            if on_corrupt == "error":
                raise
            log.warning("skipping %s (data.on_corrupt=skip)", err)
            skipped.append({"shard": entry["file"], "record_batch": err.batch_index, "reason": err.reason})
            continue
        shards.append(shard)
    if not shards:
        raise ValueError(f"the {split} split of {data_dir} has no usable shard "
                         f"({len(skipped)} skipped as corrupt)")
    return shards, skipped


class _Producer:
    """Builds batches from a state: document stream -> shuffle buffer -> packer -> this rank's rows.

    It keeps what it needs from the loader but not the loader itself, so that
    a loader dropped without `close()` is collected and stops its thread.
    """

    def __init__(self, loader: CurriculumLoader, state: dict[str, Any]) -> None:
        self.fingerprint = state["fingerprint"]
        self.step = state["step"]
        self.shards = loader.shards
        self.curriculum = loader.curriculum if loader._difficulty_column else None
        self.rows, self.seq_len, self.rank = loader.local_batch_size, loader.seq_len, loader.rank
        train = loader.split == "train"
        self.stream = DocumentStream(loader.shards, loader._blocks, seed=loader.seed, shuffle=train, loop=train,
                                     difficulty_column=loader._difficulty_column, state=tuple(state["stream"]))
        self.buffer = ShuffleBuffer(loader.shuffle_buffer, loader.seed,
                                    items=[tuple(item) for item in state["buffer"]], draws=state["draws"])
        carry = state["carry"]
        self.packer = Packer(loader.seq_len, loader.global_batch_size,
                             carry=None if carry is None else (tuple(carry[0]), carry[1]))

    def produce(self) -> Batch:
        pace_now = 100.0 if self.curriculum is None else pace(self.step, self.curriculum)
        segments = self.packer.plan(lambda: self.buffer.pop(lambda: self.stream.next(pace_now)))
        if segments is None:
            raise RuntimeError("the document stream ended inside a batch")
        rows, length = self.rows, self.seq_len
        tokens_N, doc_ids_N = materialize(segments, self.shards, self.rank * rows * length, rows * length + 1)
        self.step += 1
        return {
            "input_ids": torch.from_numpy(tokens_N[:-1].reshape(rows, length)),
            # A copy, so that masking targets in place cannot change input_ids.
            "targets": torch.from_numpy(tokens_N[1:].reshape(rows, length).copy()),
            "doc_ids": torch.from_numpy(doc_ids_N[:-1].reshape(rows, length)),
        }

    def snapshot(self) -> dict[str, Any]:
        """The state after the last batch, cheap enough to take after every batch.

        Documents are immutable tuples, so a shallow copy of the buffer is a
        snapshot; `_plain_state` turns it into lists for `state_dict()`.
        """
        return {"version": STATE_VERSION, "fingerprint": self.fingerprint, "step": self.step,
                "stream": self.stream.state(), "buffer": list(self.buffer.items), "draws": self.buffer.draws,
                "carry": self.packer.carry}


class _PrefetchThread:
    """Runs a producer ahead in a daemon thread; hands out (batch, state after it)."""

    def __init__(self, producer: _Producer, depth: int) -> None:
        self._producer = producer
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="CurriculumLoader-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                item = (self._producer.produce(), self._producer.snapshot())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # handed to the consumer, raised there
            self._queue.put(err)

    def get(self) -> tuple[Batch, dict[str, Any]]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)


def _plain_state(state: dict[str, Any]) -> dict[str, Any]:
    """A deep copy in plain Python types (lists, ints), fit for JSON or torch.save(weights_only=True)."""
    return {"version": state["version"], "fingerprint": dict(state["fingerprint"]), "step": int(state["step"]),
            "stream": [int(v) for v in state["stream"]], "buffer": [[int(v) for v in item] for item in state["buffer"]],
            "draws": int(state["draws"]),
            "carry": None if state["carry"] is None else [[int(v) for v in state["carry"][0]], int(state["carry"][1])]}
