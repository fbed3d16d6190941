"""Prepare a corpus: sources -> tokenizer -> tokens and metrics -> Arrow shards + manifest.

    python -m data_pipeline.prepare data.sources=[corpus/,more/*.jsonl] data.output=data/mine

NOTE: how a prepared directory is made.
 1. Check. The sources are resolved and checked (paths, fields, columns, an
    empty corpus), the tokenizer file and the scoring checkpoint are found:
    every configuration mistake fails here, before any work.
 2. Tokenizer. A byte-level BPE is trained on a deterministic stride sample
    of at most `tokenizer_train_bytes` of text, or `data.tokenizer` is copied.
 3. Tokenize and score (the engine). Documents are numbered in source order
    and cut into chunks; `engine.process_chunk` turns each into token lists,
    token counts, compression ratios, split keys and, with `score_with`,
    perplexities. Results come back in order into one stage file, while the
    driver counts unigrams.
 4. Corpus statistics. Rarity (mean -log p under the unigram counts, summed in
    fixed point so no float order matters), the held-out splits (documents
    in order of their content hashes: the smallest `validation_fraction`
    validate, the next `calibration_fraction` calibrate the cascade's
    router; whole documents, so no text is shared between splits), and
    percentiles of every metric against the training documents.
 5. Shards. The stage is read again, the metric and percentile columns are
    attached, and each split is written into bounded shards, then the
    manifest.
Everything happens in a temporary sibling directory that is renamed onto
`data.output` at the end, so an interrupted run never leaves a directory that
looks complete, and a previous output stays intact until the new one is whole.
`data.output` may only be absent, an empty directory or a previous output of
`prepare` (`is_prepared_directory`), and may not overlap a source: anything
else is refused in step 1, so no user file is ever replaced.

`check_prepared` is the training driver's check of a prepared directory
(shards, tokenizer, validation size) before any worker starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from data_pipeline.config import SPLITS, DataConfig
from data_pipeline.engine import make_engine
from data_pipeline.manifest import MANIFEST_FILE, PIPELINE_VERSION, ManifestError, read_manifest, write_manifest
from data_pipeline.score import (METRIC_COLUMNS, metric_stats, percentile_column, percentiles,
                                 unigram_neglogp)
from data_pipeline.shards import ShardWriter, shard_schema
from data_pipeline.source import (Document, ReadStats, SourceError, SourceFile, default_corpus_root,
                                  fingerprint_sources, iter_documents, resolve_sources)
from data_pipeline.tokenize import (TOKENIZER_FILE, check_tokenizer_hash, file_sha256, load_tokenizer_file,
                                    split_long_text, token_dtype, train_tokenizer)
from moe.atomic import check_replaceable, replace_directory

log = logging.getLogger(__name__)

STAGE_FILE = "_stage.arrow"
# Rarity is summed in fixed point (2**-24 nats) so that the sum is exact and
# independent of how documents are batched.
RARITY_SCALE = float(1 << 24)
# Keys of DataConfig that change the prepared output; the rest are read by the loader.
PREPARE_KEYS = ("sources", "text_field", "text_column", "tokenizer", "vocab_size", "eos_token",
                "tokenizer_train_bytes", "score_with", "score_seq_len", "validation_fraction",
                "calibration_fraction", "shard_max_bytes", "record_batch_bytes")
SHARD_NAME = re.compile(r"^(train|validation|calibration)-\d{5}\.arrow$")
PREPARED_KIND = f"the output of a previous prepare (a directory with its {MANIFEST_FILE})"


def prepare(cfg: Any) -> Path:
    """Prepares the corpus of `cfg` into `cfg.output`, replacing a previous output there.

    Args:
        cfg: the `data` config (DataConfig, DictConfig or dict).
    Returns:
        The prepared directory.
    Raises:
        ValueError: `data.output` overlaps a source (see `check_output`).
        ReplaceRefusedError: `data.output` is a file or a non-empty directory
            that `prepare` did not write.
        SourceError: a missing path, a wrong field/column, an empty corpus or,
            with on_corrupt=error, an unparseable record or undecodable file.
    """
    cfg = DataConfig.from_any(cfg)
    output = check_output(cfg)
    files = resolve_sources(cfg.sources, text_field=cfg.text_field, text_column=cfg.text_column,
                            on_corrupt=cfg.on_corrupt)
    if cfg.tokenizer is not None:
        load_tokenizer_file(cfg.tokenizer, eos_token=cfg.eos_token)
    if cfg.score_with is not None and not Path(cfg.score_with).exists():
        raise FileNotFoundError(f"data.score_with: no such checkpoint: {cfg.score_with!r}")
    output.parent.mkdir(parents=True, exist_ok=True)
    fingerprint = compute_fingerprint(cfg, files)

    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the data from other users of a shared volume
    try:
        _build(cfg, files, fingerprint, tmp)
        replace_directory(tmp, output, replaceable=is_prepared_directory, kind=PREPARED_KIND, label="data.output")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared %s", output)
    return output


def ensure_prepared(cfg: Any) -> Path:
    """Prepares `cfg.output` unless it exists with a manifest that matches `cfg`.

    Concurrent callers on one machine (several ranks) are serialized by a lock
    file beside the output; the first prepares, the others find it current.
    """
    cfg = DataConfig.from_any(cfg)
    output = check_output(cfg)  # before the lock file, which goes beside the output
    output.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(output.parent / f".{output.name}.lock"):
        if is_current(cfg, output):
            log.info("%s is prepared and matches the config", output)
            return output
        return prepare(cfg)


def is_current(cfg: Any, output: Path) -> bool:
    """Whether `output` holds a complete preparation of exactly this config and corpus."""
    cfg = DataConfig.from_any(cfg)
    try:
        manifest = read_manifest(output)
    except ManifestError:
        return False
    files = resolve_sources(cfg.sources, text_field=cfg.text_field, text_column=cfg.text_column,
                            on_corrupt=cfg.on_corrupt)
    return manifest.get("fingerprint") == compute_fingerprint(cfg, files)


def is_prepared_directory(path: Path) -> bool:
    """Whether `path` is a directory `prepare` wrote, which a new `prepare` may replace.

    It has our manifest.json (of any pipeline version) or, when that was lost,
    holds nothing but the files `prepare` writes, shards among them.
    """
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        manifest = None
    if isinstance(manifest, dict) and "pipeline_version" in manifest and "fingerprint" in manifest:
        return True
    names = [p.name for p in path.iterdir()]
    ours = (TOKENIZER_FILE, MANIFEST_FILE, STAGE_FILE)
    return any(SHARD_NAME.match(n) for n in names) and all(SHARD_NAME.match(n) or n in ours for n in names)


def check_output(cfg: DataConfig) -> Path:
    """Checks that `prepare` may write `cfg.output`; returns the directory it will write.

    Raises:
        ValueError: the output is, is inside or contains a source, the
            tokenizer file or the scoring checkpoint (naming both paths).
        ReplaceRefusedError: the output is a file, a non-empty directory
            that `prepare` did not write, or a broken symbolic link.
    """
    output = Path(cfg.output).expanduser()
    if output.is_symlink() and output.exists():
        output = output.resolve()  # write where the link points, keep the link
    overlap = next(_overlaps(output, cfg), None)
    if overlap is not None:
        label, relation = overlap
        raise ValueError(f"data.output={cfg.output} {relation} {label}: prepare would replace or mix with its "
                         "own input; choose a data.output outside the sources")
    check_replaceable(output, replaceable=is_prepared_directory, kind=PREPARED_KIND, label="data.output")
    return output


def _overlaps(output: Path, cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """(input, relation) for every input path that the output is, lies inside or contains."""
    inputs: list[tuple[str, Path]] = []
    candidates = {os.path.abspath(output), str(output.resolve())}
    for index, entry in enumerate(cfg.sources):
        path = Path(entry).expanduser()
        label = f"data.sources[{index}]={entry}"
        if path.exists() or not glob.has_magic(entry):
            inputs.append((label, path))
            continue
        pattern = os.path.abspath(os.path.expanduser(entry))
        for candidate in candidates:
            if any(fnmatch.fnmatchcase(str(p), pattern) for p in (Path(candidate), *Path(candidate).parents)):
                yield label, "is matched by"
        inputs.extend((f"{label} (matching {match})", Path(match))
                      for match in glob.glob(os.path.expanduser(entry), recursive=True))
    if not cfg.sources:
        inputs.append((f"the default corpus {default_corpus_root()}", default_corpus_root()))
    if cfg.tokenizer is not None:
        inputs.append((f"data.tokenizer={cfg.tokenizer}", Path(cfg.tokenizer).expanduser()))
    if cfg.score_with is not None:
        inputs.append((f"data.score_with={cfg.score_with}", Path(cfg.score_with).expanduser()))
    out = output.resolve()
    for label, path in inputs:
        path = path.resolve()
        if out == path:
            yield label, "is"
        elif path in out.parents:
            yield label, "is inside"
        elif out in path.parents:
            yield label, "contains"


def compute_fingerprint(cfg: DataConfig, files: list[SourceFile]) -> str:
    """Hash of everything the prepared output depends on."""
    settings = {key: getattr(cfg, key) for key in PREPARE_KEYS}
    settings["pipeline_version"] = PIPELINE_VERSION
    settings["corpus"] = fingerprint_sources(files)
    if cfg.tokenizer is not None:
        settings["tokenizer_sha256"] = file_sha256(cfg.tokenizer)
    if cfg.score_with is not None:
        checkpoint = Path(cfg.score_with)
        parts = sorted(checkpoint.rglob("*")) if checkpoint.is_dir() else [checkpoint]
        settings["score_with_files"] = [(str(p), p.stat().st_size, p.stat().st_mtime_ns)
                                        for p in parts if p.is_file()]
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _build(cfg: DataConfig, files: list[SourceFile], fingerprint: str, out: Path) -> None:
    tokenizer, tokenizer_info = _make_tokenizer(cfg, files, out)
    vocab_size = tokenizer.get_vocab_size()
    eos_id = tokenizer.token_to_id(cfg.eos_token)
    log.info("tokenizer: vocab %d, eos id %d", vocab_size, eos_id)

    read_stats = ReadStats()
    documents = iter_documents(files, text_field=cfg.text_field, text_column=cfg.text_column,
                               on_corrupt=cfg.on_corrupt, stats=read_stats)
    stage_path = out / STAGE_FILE
    unigram_counts = _tokenize_and_score(cfg, documents, stage_path, tokenizer.to_str(), eos_id, vocab_size)
    if unigram_counts is None:
        raise SourceError(f"empty corpus: data.sources={cfg.sources!r} holds no non-empty document "
                          f"({read_stats.num_empty_documents} empty, {read_stats.num_skipped_records} skipped)")

    stage = ipc.open_stream(pa.memory_map(str(stage_path))).read_all().to_batches()
    metrics, split_of = _corpus_statistics(cfg, stage, unigram_counts)
    splits = _write_shards(cfg, stage, metrics, split_of, out, token_dtype(vocab_size))
    del stage
    stage_path.unlink()

    num_tokens = int(metrics["length"].sum())
    train = split_of == SPLITS.index("train")
    manifest = {
        "pipeline_version": PIPELINE_VERSION,
        "fingerprint": fingerprint,
        "config": {key: getattr(cfg, key) for key in PREPARE_KEYS},
        "tokenizer": tokenizer_info,
        "vocab_size": vocab_size,
        "token_dtype": token_dtype(vocab_size).name,
        "num_documents": len(split_of),
        "num_tokens": num_tokens,
        "splits": splits,
        "split": {"method": "documents in order of the blake2b-64 hash of their text: the first "
                            "validation_fraction validate, the next calibration_fraction calibrate, the rest train",
                  "validation_fraction": cfg.validation_fraction,
                  "calibration_fraction": cfg.calibration_fraction,
                  "num_validation_documents": int((split_of == SPLITS.index("validation")).sum()),
                  "num_calibration_documents": int((split_of == SPLITS.index("calibration")).sum())},
        "metrics": {name: {"column": METRIC_COLUMNS[name], "percentile_column": percentile_column(name),
                           "percentile_reference": "train split", "all": metric_stats(values),
                           "train": metric_stats(values[train]) if train.any() else None}
                    for name, values in metrics.items()},
        "read": read_stats.to_dict(),
        "sources": {"configured": list(cfg.sources), "num_files": len(files),
                    "default_corpus": None if cfg.sources else
                    f"python standard library *.py at {default_corpus_root()}"},
    }
    write_manifest(out, manifest)


def _make_tokenizer(cfg: DataConfig, files: list[SourceFile], out: Path):
    path = out / TOKENIZER_FILE
    if cfg.tokenizer is not None:
        shutil.copyfile(cfg.tokenizer, path)
        tokenizer = load_tokenizer_file(path, eos_token=cfg.eos_token)
        info = {"trained": False, "origin": str(cfg.tokenizer)}
    else:
        sample = _TrainingSample(cfg, files)
        tokenizer = train_tokenizer(iter(sample), vocab_size=cfg.vocab_size, eos_token=cfg.eos_token)
        if sample.num_documents == 0:
            raise SourceError(f"empty corpus: data.sources={cfg.sources!r} holds no non-empty document")
        tokenizer.save(str(path))
        info = {"trained": True, "train_documents": sample.num_documents, "train_bytes": sample.num_bytes,
                "train_stride": sample.stride}
    info.update({"file": TOKENIZER_FILE, "sha256": file_sha256(path), "vocab_size": tokenizer.get_vocab_size(),
                 "eos_token": cfg.eos_token, "eos_id": tokenizer.token_to_id(cfg.eos_token)})
    return tokenizer, info


class _TrainingSample:
    """Every `stride`-th document, until `tokenizer_train_bytes` of text."""

    def __init__(self, cfg: DataConfig, files: list[SourceFile]) -> None:
        self.cfg = cfg
        self.files = files
        self.stride = max(1, math.ceil(sum(f.size for f in files) / cfg.tokenizer_train_bytes))
        self.num_documents = 0
        self.num_bytes = 0

    def __iter__(self) -> Iterator[str]:
        documents = iter_documents(self.files, text_field=self.cfg.text_field, text_column=self.cfg.text_column,
                                   on_corrupt=self.cfg.on_corrupt, stats=ReadStats(log_skips=False))
        for index, document in enumerate(documents):
            if index % self.stride:
                continue
            self.num_documents += 1
            self.num_bytes += len(document.text.encode("utf-8"))
            yield from split_long_text(document.text)  # bounded memory, the same word counts
            if self.num_bytes >= self.cfg.tokenizer_train_bytes:
                return


def _chunks(documents: Iterator[Document], chunk_bytes: int) -> Iterator[pa.Table]:
    doc_ids: list[int] = []
    sources: list[str] = []
    texts: list[str] = []
    size = 0
    for doc_id, document in enumerate(documents):
        doc_ids.append(doc_id)
        sources.append(document.source)
        texts.append(document.text)
        size += len(document.text)
        if size >= chunk_bytes:
            yield pa.table({"doc_id": pa.array(doc_ids, pa.int64()), "source": sources, "text": texts})
            doc_ids, sources, texts, size = [], [], [], 0
    if doc_ids:
        yield pa.table({"doc_id": pa.array(doc_ids, pa.int64()), "source": sources, "text": texts})


def _tokenize_and_score(cfg: DataConfig, documents: Iterator[Document], stage_path: Path, tokenizer_json: str,
                        eos_id: int, vocab_size: int):
    """Runs the engine over all chunks; writes the stage file; returns unigram counts (None if no document)."""
    engine = make_engine(cfg.engine, ray_address=cfg.ray_address)
    counts = np.zeros(vocab_size, dtype=np.int64)
    writer = None
    next_doc_id = 0
    try:
        results = engine.map_chunks(_chunks(documents, cfg.chunk_bytes), tokenizer_json=tokenizer_json,
                                    eos_id=eos_id, vocab_size=vocab_size, score_with=cfg.score_with,
                                    score_seq_len=cfg.score_seq_len)
        for table in results:
            doc_ids = table.column("doc_id").to_numpy()
            if doc_ids[0] != next_doc_id or np.any(np.diff(doc_ids) != 1):
                raise RuntimeError(f"engine {cfg.engine!r} returned documents out of order "
                                   f"(expected doc_id {next_doc_id}, got {doc_ids[:3]}...)")
            next_doc_id = int(doc_ids[-1]) + 1
            tokens = table.column("tokens").combine_chunks()
            counts += np.bincount(tokens.values.to_numpy(), minlength=vocab_size)
            if writer is None:
                writer = ipc.new_stream(str(stage_path), table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
        engine.close()
    return counts if writer is not None else None


def _corpus_statistics(cfg: DataConfig, stage: list[pa.RecordBatch], unigram_counts: np.ndarray):
    """Per-document metrics (indexed by doc_id) and each document's split (an index into SPLITS)."""
    neglogp_fixed = np.round(unigram_neglogp(unigram_counts) * RARITY_SCALE).astype(np.int64)
    columns: dict[str, list[np.ndarray]] = {"length": [], "compression": [], "rarity": [], "split_key": []}
    if cfg.score_with is not None:
        columns["perplexity"] = []
    for batch in stage:
        tokens = batch.column("tokens")
        offsets = tokens.offsets.to_numpy().astype(np.int64)
        lengths = np.diff(offsets)
        sums = np.add.reduceat(neglogp_fixed[tokens.values.to_numpy()], offsets[:-1])
        columns["rarity"].append(sums / RARITY_SCALE / lengths)
        columns["length"].append(lengths)
        columns["compression"].append(batch.column("compression").to_numpy().astype(np.float64))
        columns["split_key"].append(batch.column("split_key").to_numpy())
        if "perplexity" in columns:
            columns["perplexity"].append(batch.column("perplexity").to_numpy().astype(np.float64))
    values = {name: np.concatenate(parts) for name, parts in columns.items()}
    return values, assign_splits(values.pop("split_key"), cfg.validation_fraction, cfg.calibration_fraction)


def assign_splits(split_keys: np.ndarray, validation_fraction: float, calibration_fraction: float) -> np.ndarray:
    """Each document's split, an index into SPLITS: (N,) int8.

    Documents are ordered by their split key (a hash of their text; ties by
    document number): the first round(validation_fraction * N) validate, the
    next round(calibration_fraction * N) calibrate, the rest train. A nonzero
    fraction gets at least one document, and at least one document always
    trains (validation is served first when there are too few).
    """
    num_documents = len(split_keys)
    held_out = []
    available = num_documents - 1  # one document always trains
    for fraction in (validation_fraction, calibration_fraction):
        count = min(available, max(1, round(fraction * num_documents))) if fraction > 0 else 0
        held_out.append(max(0, count))
        available -= held_out[-1]
    order = np.lexsort((np.arange(num_documents), split_keys))
    split_of = np.full(num_documents, SPLITS.index("train"), dtype=np.int8)
    num_validation, num_calibration = held_out
    split_of[order[:num_validation]] = SPLITS.index("validation")
    split_of[order[num_validation:num_validation + num_calibration]] = SPLITS.index("calibration")
    return split_of


def _write_shards(cfg: DataConfig, stage: list[pa.RecordBatch], metrics: dict[str, np.ndarray],
                  split_of: np.ndarray, out: Path, dtype: np.dtype) -> dict[str, Any]:
    train = split_of == SPLITS.index("train")
    pct = {name: percentiles(values, values[train]).astype(np.float32) for name, values in metrics.items()}
    schema = shard_schema(dtype, list(metrics), PIPELINE_VERSION)

    writers = {split: ShardWriter(out, split, schema, shard_max_bytes=cfg.shard_max_bytes,
                                  record_batch_bytes=cfg.record_batch_bytes)
               for split in SPLITS}
    start = 0
    for batch in stage:
        end = start + batch.num_rows
        columns = {name: batch.column(name) for name in ("doc_id", "source", "tokens", "n_tokens", "compression")}
        columns["rarity"] = pa.array(metrics["rarity"][start:end].astype(np.float32))
        if "perplexity" in metrics:
            columns["perplexity"] = batch.column("perplexity")
        for name in metrics:
            columns[percentile_column(name)] = pa.array(pct[name][start:end])
        table = pa.table(columns)
        for index, split in enumerate(SPLITS):
            writers[split].write(table.filter(pa.array(split_of[start:end] == index)))
        start = end

    splits = {}
    for split, writer in writers.items():
        shards = writer.close()
        splits[split] = {"num_documents": sum(s["num_documents"] for s in shards),
                         "num_tokens": sum(s["num_tokens"] for s in shards), "shards": shards}
    return splits


def check_prepared(data_dir: Union[str, Path], *, seq_len: int, global_batch_size: int, need_validation: bool,
                   on_corrupt: str) -> None:
    """Checks on the driver that a prepared directory can feed a run, before any worker starts.

    The checks are the loader's own (same shard verification, same count of
    validation batches), so what passes here does not fail in a worker.

    Args:
        data_dir: the prepared directory.
        seq_len: tokens per sequence (data.seq_len).
        global_batch_size: sequences per step across all ranks.
        need_validation: the run evaluates, so the validation split must hold
            at least one global batch.
        on_corrupt: `error` refuses a damaged shard; `skip` logs a warning for
            each and fails only when a split has no usable shard left.
    Raises:
        ValueError (ManifestError, ShardError, TokenizerMismatchError): with a
            one-line message naming the file or config key at fault.
    """
    from data_pipeline.loader import num_validation_batches, open_split_shards, validation_too_small_message

    data_dir = Path(data_dir)  # (the loader imports torch: not needed by `python -m data_pipeline.prepare`)
    manifest = read_manifest(data_dir)
    try:
        check_tokenizer_hash(data_dir / TOKENIZER_FILE, manifest["tokenizer"]["sha256"])
    except FileNotFoundError as err:
        raise ManifestError(str(err)) from err
    open_split_shards(data_dir, manifest, "train", on_corrupt=on_corrupt)
    if not manifest["splits"]["validation"]["shards"]:
        if need_validation:
            raise ValueError(f"{data_dir} has no validation split (prepared with data.validation_fraction="
                             f"{manifest['split']['validation_fraction']} from {manifest['num_documents']} "
                             "documents) but the run evaluates on it: set data.validation_fraction > 0 "
                             "(and a corpus of at least 2 documents)")
        return
    shards, _ = open_split_shards(data_dir, manifest, "validation", on_corrupt=on_corrupt)
    num_tokens = sum(shard.entry["num_tokens"] for shard in shards)
    num_documents = sum(shard.entry["num_documents"] for shard in shards)
    if need_validation and num_validation_batches(num_tokens, seq_len=seq_len,
                                                  global_batch_size=global_batch_size) == 0:
        raise ValueError(validation_too_small_message(data_dir, manifest, num_tokens, num_documents,
                                                      seq_len=seq_len, global_batch_size=global_batch_size))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _main() -> None:
    import hydra
    from omegaconf import DictConfig

    from data_pipeline.config import register_configs

    register_configs()

    # Entry point only: Hydra composes conf/data_prepare.yaml (which selects
    # conf/data/default.yaml) and hands the `data` node to `prepare`.
    @hydra.main(version_base="1.3", config_path="../conf", config_name="data_prepare")
    def main(cfg: DictConfig) -> None:
        try:
            output = prepare(cfg.data)
        except (ValueError, FileNotFoundError) as err:
            # A mistake in the config or the corpus: one line that names it, no traceback.
            print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print("\ninterrupted: the previous data.output, if any, is unchanged", file=sys.stderr)
            sys.exit(130)  # the shell's code for a process ended by SIGINT
        manifest = read_manifest(output)
        splits = manifest["splits"]
        print(f"prepared {output}: {manifest['num_documents']} documents, {manifest['num_tokens']} tokens, "
              f"vocab {manifest['vocab_size']}; train {splits['train']['num_documents']} docs in "
              f"{len(splits['train']['shards'])} shard(s), validation {splits['validation']['num_documents']} "
              f"docs, calibration {splits['calibration']['num_documents']} docs; undecodable bytes replaced: "
              f"{manifest['read']['num_undecodable_bytes']}")

    main()


if __name__ == "__main__":
    _main()
