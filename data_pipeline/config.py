"""Typed, validated configuration of the data pipeline (the `data` config group).

`DataConfig` holds what `prepare` needs (sources, tokenizer, scoring, shard
sizes) and what the loader needs (sequence length, seed, curriculum).
`CurriculumConfig` names the pacing parameters the way DeepSpeed's
data-efficiency library does (`total_curriculum_step`, `min_difficulty`,
`difficulty_step`, `root_degree`, `difficulty`, `max_step`). Both validate at
construction and raise `ValueError` naming the field, so a typo or a bad value
fails before any file is read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

ENGINES = ("local", "ray")
ON_CORRUPT = ("error", "skip")
SCHEDULES = ("none", "fixed_linear", "fixed_root", "fixed_discrete")
METRICS = ("length", "compression", "rarity", "perplexity")
SPLITS = ("train", "validation", "calibration")


def _check_positive_int(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


def _check_choice(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in choices:
        raise ValueError(f"{type(obj).__name__}.{name} must be one of {list(choices)}, got {value!r}")


@dataclass
class CurriculumConfig:
    """Curriculum pacing, with DeepSpeed's names and semantics.

    Difficulties are percentiles (0-100) of `metric` over the training split, so
    DeepSpeed's `max_difficulty` is always 100: once the curriculum ends every
    document is eligible.

    Attributes:
        schedule: `none` (plain shuffled order), `fixed_linear`, `fixed_root`
            or `fixed_discrete`.
        metric: `length`, `compression`, `rarity` or `perplexity` (the last only
            for data prepared with `score_with`).
        total_curriculum_step: steps that fixed_linear/fixed_root take to reach 100.
        min_difficulty: percentile at step 0 (fixed_linear/fixed_root).
        difficulty_step: pace is rounded down to a multiple of this.
        root_degree: degree of the root for fixed_root (2 = square root).
        difficulty: fixed_discrete percentiles, non-decreasing, ending at 100.
        max_step: fixed_discrete last step of each difficulty but the final one.
    """

    schedule: str = "none"
    metric: str = "length"
    total_curriculum_step: int = 1000
    min_difficulty: float = 10.0
    difficulty_step: int = 1
    root_degree: int = 2
    difficulty: list[float] = field(default_factory=lambda: [25.0, 50.0, 100.0])
    max_step: list[int] = field(default_factory=lambda: [100, 200])

    def __post_init__(self) -> None:
        self.difficulty = [float(d) for d in self.difficulty]
        self.max_step = [int(s) for s in self.max_step]
        _check_choice(self, "schedule", SCHEDULES)
        _check_choice(self, "metric", METRICS)
        _check_positive_int(self, "total_curriculum_step", "difficulty_step", "root_degree")
        if not 0 <= self.min_difficulty <= 100:
            raise ValueError(f"CurriculumConfig.min_difficulty must be a percentile in [0, 100], "
                             f"got {self.min_difficulty!r}")
        if self.schedule == "fixed_discrete":
            if len(self.difficulty) != len(self.max_step) + 1 or not self.max_step:
                raise ValueError("CurriculumConfig.difficulty must have exactly one more entry than "
                                 f"CurriculumConfig.max_step (DeepSpeed fixed_discrete), got "
                                 f"difficulty={self.difficulty} and max_step={self.max_step}")
            if any(b < a for a, b in zip(self.difficulty, self.difficulty[1:])) or self.difficulty[0] < 0:
                raise ValueError("CurriculumConfig.difficulty must be non-negative and non-decreasing, "
                                 f"got {self.difficulty}")
            if self.difficulty[-1] != 100:
                raise ValueError("CurriculumConfig.difficulty must end at 100 so that every document is "
                                 f"eligible once the curriculum ends, got {self.difficulty}")
            if any(b <= a for a, b in zip(self.max_step, self.max_step[1:])) or self.max_step[0] < 0:
                raise ValueError(f"CurriculumConfig.max_step must be increasing and non-negative, "
                                 f"got {self.max_step}")


@dataclass
class DataConfig:
    """The `data` config group: corpus preparation and streaming.

    Attributes:
        sources: files, directories or globs; directories are read recursively.
            `*.jsonl`/`*.ndjson` are JSON lines, `*.parquet` Parquet, anything
            else plain text. Empty: the Python standard library of the running
            interpreter (the embedded default corpus).
        output: the prepared directory.
        text_field: the JSONL field holding the text.
        text_column: the Parquet column holding the text.
        tokenizer: an existing Hugging Face `tokenizer.json`; None trains a
            byte-level BPE of `vocab_size` on the corpus.
        vocab_size: vocabulary of the trained tokenizer.
        eos_token: appended to every document; must exist in a loaded tokenizer.
        tokenizer_train_bytes: the BPE trains on at most this much text, a
            deterministic stride sample of the documents.
        seq_len: tokens per training sequence (the loader packs seq_len + 1).
        engine: `local` (one process) or `ray` (Ray Data tokenization and scoring).
        ray_address: the cluster to join for engine=ray; None starts/uses a local one.
        on_corrupt: `error` or `skip`, for corrupt shards (loader,
            `check_prepared`) and, in prepare, unparseable source records,
            unreadable Parquet files and documents that are not text.
        score_with: a `moe` checkpoint whose perplexity becomes a metric;
            required by curriculum.metric=perplexity.
        score_seq_len: window length for perplexity scoring.
        validation_fraction: share of documents held out for validation (the
            training run's evaluation, and the cascade's test queries).
        calibration_fraction: share of documents held out for calibrating the
            cascade's router (`cascade.calibrate`); neither training nor
            validation reads them.
        shard_max_bytes: bound on the size of one `*.arrow` shard.
        record_batch_bytes: target size of one record batch inside a shard.
        chunk_bytes: text per tokenization task (local loop or Ray task).
        seed: shuffle seed of the loader.
        shuffle_buffer: documents in the loader's shuffle buffer.
        prefetch: batches prepared ahead by the loader's background thread.
        curriculum: pacing of the loader.
    """

    sources: list[str] = field(default_factory=list)
    output: str = "data/prepared"
    text_field: str = "text"
    text_column: str = "text"
    tokenizer: Optional[str] = None
    vocab_size: int = 8192
    eos_token: str = "<|endoftext|>"
    tokenizer_train_bytes: int = 64 << 20
    seq_len: int = 256
    engine: str = "local"
    ray_address: Optional[str] = None
    on_corrupt: str = "error"
    score_with: Optional[str] = None
    score_seq_len: int = 256
    validation_fraction: float = 0.04
    calibration_fraction: float = 0.04
    shard_max_bytes: int = 32 << 20
    record_batch_bytes: int = 1 << 20
    chunk_bytes: int = 4 << 20
    seed: int = 0
    shuffle_buffer: int = 1024
    prefetch: int = 2
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)

    def __post_init__(self) -> None:
        if isinstance(self.curriculum, dict):
            self.curriculum = _strict_init(CurriculumConfig, self.curriculum, prefix="curriculum.")
        if isinstance(self.sources, str):
            self.sources = [self.sources]
        self.sources = [str(s) for s in self.sources]
        _check_positive_int(self, "vocab_size", "tokenizer_train_bytes", "seq_len", "score_seq_len",
                            "shard_max_bytes", "record_batch_bytes", "chunk_bytes", "shuffle_buffer")
        if self.vocab_size < 257:
            raise ValueError(f"DataConfig.vocab_size must be at least 257 (256 bytes + EOS), got {self.vocab_size}")
        _check_choice(self, "engine", ENGINES)
        _check_choice(self, "on_corrupt", ON_CORRUPT)
        for name in ("validation_fraction", "calibration_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"DataConfig.{name} must be in [0, 1), got {value!r}")
        if self.validation_fraction + self.calibration_fraction >= 1:
            raise ValueError(f"DataConfig.validation_fraction + calibration_fraction must be below 1 (the rest "
                             f"trains), got {self.validation_fraction} + {self.calibration_fraction}")
        if self.record_batch_bytes > self.shard_max_bytes:
            raise ValueError(f"DataConfig.record_batch_bytes ({self.record_batch_bytes}) must not exceed "
                             f"DataConfig.shard_max_bytes ({self.shard_max_bytes})")
        if not isinstance(self.prefetch, int) or self.prefetch < 0:
            raise ValueError(f"DataConfig.prefetch must be a non-negative integer, got {self.prefetch!r}")
        if not self.output:
            raise ValueError("DataConfig.output must name the prepared directory")
        if not self.eos_token:
            raise ValueError("DataConfig.eos_token must be a non-empty string")
        if self.curriculum.metric == "perplexity" and self.score_with is None:
            # Caught here, not in every worker's loader after the data is prepared.
            raise ValueError("data.curriculum.metric=perplexity needs data.score_with (the moe checkpoint whose "
                             "perplexity scores the documents), which is null")

    @classmethod
    def from_any(cls, cfg: Any) -> "DataConfig":
        """Builds a validated config from a DataConfig, an OmegaConf node or a mapping.

        Unknown keys are rejected by name (`data.curriculum.shedule` fails here,
        before any work).
        """
        if isinstance(cfg, cls):
            return cfg
        try:
            from omegaconf import DictConfig, OmegaConf
        except ImportError:  # pragma: no cover - omegaconf is a declared dependency
            DictConfig = ()
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        if not isinstance(cfg, dict):
            raise TypeError(f"expected a DataConfig, a DictConfig or a dict, got {type(cfg).__name__}")
        return _strict_init(cls, cfg, prefix="")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _strict_init(cls: type, data: dict[str, Any], prefix: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown data config key(s): {', '.join('data.' + prefix + k for k in unknown)}")
    return cls(**data)


def register_configs() -> None:
    """Registers the schema as `data/base_data` in Hydra's ConfigStore.

    `conf/data/*.yaml` start from it (`defaults: [base_data, _self_]`), so
    a mistyped key or a wrongly typed value fails at composition time.
    """
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="data", name="base_data", node=DataConfig)
