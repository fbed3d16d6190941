"""Stage 1, source: find the corpus files and read them as documents.

A source is a file, a directory (read recursively, hidden entries skipped) or a
glob. Files are read by kind: `*.jsonl`/`*.ndjson` are JSON lines with the text
in `text_field`, `*.parquet` has it in `text_column`, anything else is one
plain-text document per file. With no sources, the corpus is the standard
library of the running interpreter (`*.py` under `sysconfig`'s stdlib, without
site-packages): real text that exists on every machine.

`resolve_sources` checks everything it can cheaply (paths exist, fields and
columns exist and hold text, the corpus is not empty) and raises `SourceError`
naming the path or field before any tokenization starts. `iter_documents`
yields the documents in a deterministic order (sorted paths, then record
order), counts undecodable bytes (replaced by U+FFFD) and skips empty
documents. Damage found while reading (an unparseable JSONL line, an unreadable
Parquet file, a document that is not text: NUL bytes or more than
`MAX_UNDECODABLE_SHARE` of its bytes not UTF-8, say an executable) raises
`SourceError` naming the file (and line) with on_corrupt=error; with
on_corrupt=skip it is skipped, counted and logged as a warning.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import logging
import os
import sysconfig
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
# A document with more undecodable bytes than this share gets a warning naming it.
MAX_UNDECODABLE_SHARE = 0.1
# With on_corrupt=skip, lines read to find a parseable JSONL record to check the field on.
JSONL_CHECK_LINES = 100
# Skipped records named one by one in the log; the rest are only counted.
MAX_LOGGED_SKIPS = 20


class SourceError(ValueError):
    """A source path, field or record that cannot be used; the message names it."""


@dataclass(frozen=True)
class SourceFile:
    path: Path
    kind: str  # "text", "jsonl" or "parquet"
    size: int
    mtime_ns: int


@dataclass
class Document:
    source: str
    text: str
    num_undecodable_bytes: int = 0


@dataclass
class ReadStats:
    """What reading the corpus replaced or skipped; reported in the manifest."""

    num_undecodable_bytes: int = 0
    num_documents_with_undecodable_bytes: int = 0
    num_empty_documents: int = 0
    num_skipped_records: int = 0
    skipped_records: list[str] = field(default_factory=list)
    log_skips: bool = True  # False for a second pass over the same corpus

    def skip(self, where: str, reason: str) -> None:
        """Counts a record or file skipped under on_corrupt=skip, and logs it."""
        self.num_skipped_records += 1
        self.skipped_records.append(f"{where}: {reason}")
        if self.log_skips and self.num_skipped_records <= MAX_LOGGED_SKIPS:
            log.warning("skipping %s: %s (data.on_corrupt=skip)%s", where, reason,
                        "; further skips are only counted" if self.num_skipped_records == MAX_LOGGED_SKIPS else "")

    def to_dict(self) -> dict:
        return {
            "num_undecodable_bytes": self.num_undecodable_bytes,
            "num_documents_with_undecodable_bytes": self.num_documents_with_undecodable_bytes,
            "num_empty_documents": self.num_empty_documents,
            "num_skipped_records": self.num_skipped_records,
            # The first few, so that the manifest stays small on a bad corpus.
            "skipped_records": self.skipped_records[:20],
        }


def default_corpus_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files() -> list[Path]:
    """The `*.py` files of the running interpreter's standard library."""
    root = default_corpus_root()
    return sorted(p for p in root.rglob("*.py")
                  if "site-packages" not in p.relative_to(root).parts and p.is_file())


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def _walk(directory: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(Path(root) / n for n in names if not n.startswith("."))
    return files


def resolve_sources(sources: list[str], *, text_field: str = "text", text_column: str = "text",
                    on_corrupt: str = "error") -> list[SourceFile]:
    """Expands and checks the configured sources.

    Args:
        sources: paths, directories or globs (`data.sources`); empty means the
            default corpus.
        text_field: JSONL field that must be present in every JSONL file.
        text_column: Parquet column that must be present, holding text, in
            every Parquet file.
        on_corrupt: with `skip`, an unreadable Parquet file or unparseable
            first JSONL line is left for `iter_documents` to skip.
    Returns:
        The corpus files, sorted by path, without duplicates.
    Raises:
        SourceError: a missing path, a glob that matches nothing, an empty
            corpus, a JSONL field / Parquet column that does not exist, a
            Parquet column that does not hold text, or (on_corrupt=error) an
            unreadable Parquet file or unparseable first JSONL record.
    """
    paths: list[Path] = []
    if not sources:
        paths = default_corpus_files()
        if not paths:
            raise SourceError(f"the default corpus (the standard library at {default_corpus_root()}) "
                              "has no *.py files; set data.sources")
    for index, entry in enumerate(sources):
        path = Path(entry).expanduser()
        if path.is_dir():
            found = _walk(path)
            if not found:
                raise SourceError(f"data.sources[{index}]: directory {entry!r} contains no files")
        elif path.is_file():
            found = [path]
        elif glob.has_magic(entry):
            found = []
            for match in sorted(glob.glob(os.path.expanduser(entry), recursive=True)):
                match_path = Path(match)
                found.extend(_walk(match_path) if match_path.is_dir() else [match_path])
            if not found:
                raise SourceError(f"data.sources[{index}]: the glob {entry!r} matches no files")
        else:
            raise SourceError(f"data.sources[{index}]: no such file or directory: {entry!r}")
        paths.extend(found)

    files = []
    for path in sorted(set(p.absolute() for p in paths), key=str):
        stat = path.stat()
        files.append(SourceFile(path, _kind(path), stat.st_size, stat.st_mtime_ns))
    for source_file in files:
        _check_fields(source_file, text_field, text_column, on_corrupt)
    if all(f.size == 0 for f in files):
        raise SourceError(f"empty corpus: the {len(files)} source file(s) of data.sources={sources!r} "
                          "are all empty")
    return files


def _is_text_type(type_: pa.DataType) -> bool:
    if pa.types.is_dictionary(type_):
        return _is_text_type(type_.value_type)
    return (pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_binary(type_)
            or pa.types.is_large_binary(type_) or pa.types.is_null(type_))


def _check_fields(source_file: SourceFile, text_field: str, text_column: str, on_corrupt: str) -> None:
    path = source_file.path
    if source_file.kind == "parquet":
        try:
            schema = pq.read_schema(path)
        except Exception as err:  # pyarrow raises several types for a bad footer
            if on_corrupt == "skip":
                return  # iter_documents skips it, with a warning
            raise SourceError(f"{path}: not a readable Parquet file ({err}); data.on_corrupt=skip would skip "
                              "it") from err
        if text_column not in schema.names:
            raise SourceError(f"{path}: no column data.text_column={text_column!r} (columns: {schema.names})")
        column_type = schema.field(text_column).type
        if not _is_text_type(column_type):
            raise SourceError(f"{path}: column data.text_column={text_column!r} holds {column_type}, not text "
                              "(string or binary)")
    elif source_file.kind == "jsonl" and source_file.size:
        with open(path, "rb") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    break
                except ValueError as err:  # JSONDecodeError, or UnicodeDecodeError from bytes
                    if on_corrupt == "error":
                        raise SourceError(f"{path}:{line_no}: not valid JSON ({err})") from err
                    if line_no >= JSONL_CHECK_LINES:
                        return  # nothing parseable so far: iter_documents counts what it skips
            else:
                return
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise SourceError(f"{path}:{line_no}: no field data.text_field={text_field!r} (found: {keys})")


def fingerprint_sources(files: list[SourceFile]) -> str:
    """A cheap change detector for the corpus: paths, sizes and modification times."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.path}\0{f.kind}\0{f.size}\0{f.mtime_ns}\n".encode())
    return digest.hexdigest()


_decode_counter = threading.local()


def _count_and_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    _decode_counter.value += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("data_pipeline.count_and_replace", _count_and_replace)


def decode(data: bytes) -> tuple[str, int]:
    """UTF-8 decodes `data`, replacing undecodable bytes; returns (text, bytes replaced).

    See `not_text_reason` for telling a text with a few bad bytes from a binary file.
    """
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    _decode_counter.value = 0
    text = data.decode("utf-8", errors="data_pipeline.count_and_replace")
    return text, _decode_counter.value


def not_text_reason(data: bytes, num_undecodable_bytes: int, where: str = "") -> Optional[str]:
    """Why `data` is not text (NUL bytes: a binary file), or None for text.

    A document that is mostly not UTF-8 but has no NUL byte is text in another
    encoding (the standard library ships KOI8-R and Latin-1 test modules): it is
    kept, its bad bytes replaced and counted, with a warning naming it.
    """
    if b"\0" in data:
        return f"not text: it contains NUL bytes ({data.count(0)} of {len(data)} bytes; a binary file?)"
    if num_undecodable_bytes > MAX_UNDECODABLE_SHARE * len(data):
        log.warning("%s: %d of its %d bytes are not UTF-8 (more than %.0f%%); kept with those bytes replaced "
                    "by U+FFFD (another encoding?)", where or "a document", num_undecodable_bytes, len(data),
                    100 * MAX_UNDECODABLE_SHARE)
    return None


def iter_documents(files: list[SourceFile], *, text_field: str = "text", text_column: str = "text",
                   on_corrupt: str = "error", stats: Optional[ReadStats] = None) -> Iterator[Document]:
    """Yields the non-empty documents of `files` in order.

    Args:
        files: from `resolve_sources`.
        text_field, text_column: where JSONL / Parquet keep the text.
        on_corrupt: `error` raises `SourceError` on an unparseable record, an
            unreadable file or a document that is not text; `skip` skips it,
            logs a warning and counts it in `stats`.
        stats: receives the counts of replaced bytes and skipped documents.
    """
    stats = stats if stats is not None else ReadStats()
    for source_file in files:
        for doc in _read_file(source_file, text_field, text_column, on_corrupt, stats):
            if doc.num_undecodable_bytes:
                stats.num_undecodable_bytes += doc.num_undecodable_bytes
                stats.num_documents_with_undecodable_bytes += 1
            if not doc.text.strip():
                stats.num_empty_documents += 1
                continue
            yield doc


def _read_file(source_file: SourceFile, text_field: str, text_column: str, on_corrupt: str,
               stats: ReadStats) -> Iterator[Document]:
    path = source_file.path

    def corrupt(where: str, reason: str, err: Optional[BaseException] = None) -> None:
        if on_corrupt == "error":
            raise SourceError(f"{where}: {reason}") from err
        stats.skip(where, reason)

    if source_file.kind == "text":
        data = path.read_bytes()
        text, num_bad = decode(data)
        reason = not_text_reason(data, num_bad, str(path))
        if reason is not None:
            corrupt(str(path), reason)
            return
        yield Document(str(path), text, num_bad)
    elif source_file.kind == "jsonl":
        with open(path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                line, num_bad = decode(raw)
                where = f"{path}:{line_no}"
                try:
                    record = json.loads(line)
                    text = record[text_field]
                    if not isinstance(text, str):
                        raise TypeError(f"field {text_field!r} is a {type(text).__name__}, not a string")
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    reason = f"no field data.text_field={text_field!r}" if isinstance(err, KeyError) else str(err)
                    corrupt(where, reason, err)
                    continue
                reason = not_text_reason(raw, num_bad, where)
                if reason is not None:
                    corrupt(where, reason)
                    continue
                yield Document(where, text, num_bad)
    else:
        try:
            parquet = pq.ParquetFile(path)
            for group in range(parquet.num_row_groups):
                column = parquet.read_row_group(group, columns=[text_column]).column(0)
                if not _is_text_type(column.type):
                    raise SourceError(f"{path}: column data.text_column={text_column!r} holds {column.type}, "
                                      "not text (string or binary)")
                for row, value in enumerate(column.to_pylist()):
                    where = f"{path}:{group}:{row}"
                    num_bad = 0
                    if isinstance(value, bytes):
                        raw = value
                        value, num_bad = decode(raw)
                        reason = not_text_reason(raw, num_bad, where)
                        if reason is not None:
                            corrupt(where, reason)
                            continue
                    yield Document(where, value or "", num_bad)
        except SourceError:
            raise
        except Exception as err:  # a damaged file surfaces as one of several pyarrow errors
            corrupt(str(path), f"cannot read Parquet column data.text_column={text_column!r} ({err})", err)
