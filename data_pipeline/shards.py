"""Stage 4, shards: Arrow IPC stream files of bounded size, written and verified.

A shard `{split}-{index:05d}.arrow` is a plain Arrow IPC *stream* (readable by
`pyarrow.ipc.open_stream`). Each record batch holds whole documents in doc_id
order; a shard holds whole record batches and stays under `shard_max_bytes`
unless a single document is larger. After a shard is closed its record batches
are located (byte offset and length of each IPC message) and check-summed
(crc32) for the manifest, so that the loader can verify a shard before use and
seek any record batch of a memory-mapped shard without reading the others.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from data_pipeline.config import METRICS

# Arrow's end-of-stream marker: continuation token and a zero length.
_END_OF_STREAM_BYTES = 8


class ShardError(ValueError):
    """A truncated or corrupted shard; names the shard and the record batch."""

    def __init__(self, shard: Path, batch_index: Optional[int], reason: str) -> None:
        where = f"shard {shard}" + (f", record batch {batch_index}" if batch_index is not None else "")
        super().__init__(f"corrupt {where}: {reason}")
        self.shard = Path(shard)
        self.batch_index = batch_index
        self.reason = reason

    def __reduce__(self):
        # Rebuilt from its fields: the default would call __init__ with the message
        # alone, which fails where the error crosses a process boundary (Ray).
        return type(self), (self.shard, self.batch_index, self.reason)


def shard_schema(token_type: np.dtype, metrics: list[str], pipeline_version: int) -> pa.Schema:
    """The schema of every shard: document columns, metric values, metric percentiles."""
    fields = [pa.field("doc_id", pa.int64()), pa.field("source", pa.string()),
              pa.field("tokens", pa.list_(pa.from_numpy_dtype(token_type))), pa.field("n_tokens", pa.int32()),
              pa.field("compression", pa.float32()), pa.field("rarity", pa.float32())]
    if "perplexity" in metrics:
        fields.append(pa.field("perplexity", pa.float32()))
    fields += [pa.field(f"{name}_pct", pa.float32()) for name in METRICS if name in metrics]
    return pa.schema(fields, metadata={"data_pipeline.pipeline_version": str(pipeline_version)})


def _row_bytes(table: pa.Table, token_itemsize: int) -> np.ndarray:
    """Deterministic per-row size estimate used to cut record batches."""
    fixed = sum(field.type.bit_width // 8 for field in table.schema
                if pa.types.is_integer(field.type) or pa.types.is_floating(field.type))
    n_tokens = table.column("n_tokens").to_numpy().astype(np.int64)
    source_lengths = np.asarray(pc.binary_length(table.column("source")).to_numpy(), dtype=np.int64)
    return n_tokens * token_itemsize + source_lengths + fixed + 8  # + list and string offsets


class ShardWriter:
    """Writes the rows of one split into record batches and bounded shards.

    Args:
        directory: where the shards go.
        split: `train` or `validation` (the file name prefix).
        schema: the shard schema.
        shard_max_bytes: a shard is closed before it would grow past this.
        record_batch_bytes: rows are grouped until a batch reaches this size.
    """

    def __init__(self, directory: Path, split: str, schema: pa.Schema, *, shard_max_bytes: int,
                 record_batch_bytes: int) -> None:
        self.directory = directory
        self.split = split
        self.schema = schema
        self.shard_max_bytes = shard_max_bytes
        self.record_batch_bytes = record_batch_bytes
        self.token_itemsize = schema.field("tokens").type.value_type.bit_width // 8
        self._pending: list[pa.Table] = []
        self._pending_bytes = 0
        self._sink: Optional[pa.NativeFile] = None
        self._writer: Optional[ipc.RecordBatchStreamWriter] = None
        self._paths: list[Path] = []

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        table = table.select(self.schema.names).cast(self.schema)
        self._pending.append(table)
        self._pending_bytes += int(_row_bytes(table, self.token_itemsize).sum())
        while self._pending_bytes >= self.record_batch_bytes:
            self._flush(final=False)

    def close(self) -> list[dict[str, Any]]:
        """Writes what is pending, closes the last shard and returns the shard entries."""
        while self._pending:
            self._flush(final=True)
        self._close_shard()
        return [describe_shard(path, self.schema, split=self.split) for path in self._paths]

    def _flush(self, final: bool) -> None:
        table = pa.concat_tables(self._pending).combine_chunks()
        cumulative = np.cumsum(_row_bytes(table, self.token_itemsize))
        if final and cumulative[-1] < self.record_batch_bytes:
            cut = table.num_rows
        else:
            cut = int(np.searchsorted(cumulative, self.record_batch_bytes, side="left")) + 1
        batch = table.slice(0, cut).combine_chunks().to_batches()[0]
        rest = table.slice(cut)
        self._pending = [rest] if rest.num_rows else []
        self._pending_bytes = int(cumulative[-1] - cumulative[cut - 1])
        self._write_batch(batch)

    def _write_batch(self, batch: pa.RecordBatch) -> None:
        batch = _canonical(batch)
        size = ipc.get_record_batch_size(batch)
        if self._writer is not None and self._sink.tell() + size + _END_OF_STREAM_BYTES > self.shard_max_bytes:
            self._close_shard()
        if self._writer is None:
            path = self.directory / f"{self.split}-{len(self._paths):05d}.arrow"
            self._paths.append(path)
            self._sink = pa.OSFile(str(path), "wb")
            self._writer = ipc.new_stream(self._sink, self.schema)
        self._writer.write_batch(batch)

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None


def _canonical(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The batch rebuilt on fresh, exactly sized buffers.

    The IPC writer writes a buffer as it finds it: a slice of a larger
    buffer, or a builder's over-allocation, would change the bytes of the shard
    with the history of the data (chunking, engine) rather than the data.
    """
    columns = []
    for column in batch.columns:
        assert column.null_count == 0, "shard columns have no nulls"
        if pa.types.is_string(column.type):
            offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset:column.offset + len(column) + 1]
            data = column.buffers()[2]
            data = b"" if data is None else data[offsets[0]:offsets[-1]]
            columns.append(pa.StringArray.from_buffers(
                len(column), pa.py_buffer((offsets - offsets[0]).astype(np.int32).tobytes()),
                pa.py_buffer(bytes(data))))
        elif pa.types.is_list(column.type):
            offsets = column.offsets.to_numpy()
            values = column.values.to_numpy()[offsets[0]:offsets[-1]].copy()
            columns.append(pa.ListArray.from_arrays(pa.array((offsets - offsets[0]).astype(np.int32)),
                                                    pa.array(values, type=column.type.value_type)))
        else:
            columns.append(pa.array(column.to_numpy().copy(), type=column.type))
    return pa.RecordBatch.from_arrays(columns, schema=batch.schema)


def describe_shard(path: Path, schema: pa.Schema, *, split: str) -> dict[str, Any]:
    """Locates and check-sums the record batches of a shard for the manifest."""
    source = pa.memory_map(str(path))
    reader = ipc.MessageReader.open_stream(source)
    batches, num_rows, num_tokens = [], 0, 0
    data = np.frombuffer(pa.memory_map(str(path)).read_buffer(), dtype=np.uint8)
    while True:
        offset = source.tell()
        try:
            message = reader.read_next_message()
        except StopIteration:
            break
        if message.type != "record batch":
            continue
        length = source.tell() - offset
        batch = ipc.read_record_batch(message, schema)
        rows = batch.num_rows
        tokens = int(pc.sum(batch.column("n_tokens")).as_py())
        batches.append({"offset": offset, "length": length, "num_rows": rows, "num_tokens": tokens,
                        "crc32": zlib.crc32(data[offset:offset + length])})
        num_rows += rows
        num_tokens += tokens
    return {"file": path.name, "split": split, "num_bytes": int(source.size()), "num_documents": num_rows,
            "num_tokens": num_tokens, "record_batches": batches}


@dataclass
class Block:
    """One record batch of a shard, seen through numpy.

    `token_starts` index each document's first token in the whole shard file
    viewed as an array of tokens (`MappedShard.token_view`), so a document can
    be read later from nothing but (shard index, token start, token count).
    """

    doc_ids: np.ndarray        # int64 (rows,)
    n_tokens: np.ndarray       # int64 (rows,)
    token_starts: np.ndarray   # int64 (rows,) index into MappedShard.token_view
    difficulty: Optional[np.ndarray]  # float32 (rows,) percentile of the curriculum metric


class MappedShard:
    """A memory-mapped shard: verified once, then read one record batch at a time.

    Args:
        path: the shard file.
        entry: its manifest entry (from `describe_shard`).
        schema: the expected schema.
    """

    def __init__(self, path: Path, entry: dict[str, Any], schema: pa.Schema) -> None:
        self.path = path
        self.entry = entry
        self.schema = schema
        if not path.is_file():
            raise ShardError(path, None, "the file is missing")
        try:
            self._source = pa.memory_map(str(path))
        except OSError as err:
            raise ShardError(path, None, f"cannot be memory-mapped ({err})") from err
        self._buffer = self._source.read_buffer()  # zero-copy: the whole mapping
        self.bytes = np.frombuffer(self._buffer, dtype=np.uint8)
        self.token_dtype = np.dtype(schema.field("tokens").type.value_type.to_pandas_dtype())
        # The whole file as tokens: IPC aligns every buffer to 8 bytes, so each
        # record batch's token values start at a whole token of this view.
        itemsize = self.token_dtype.itemsize
        self.token_view = self.bytes[:len(self.bytes) - len(self.bytes) % itemsize].view(self.token_dtype)

    def verify(self, *, check_crc: bool = True) -> None:
        """Checks size, schema, checksums and structure; raises `ShardError` at the first fault."""
        batches = self.entry["record_batches"]
        size = len(self.bytes)
        for index, batch in enumerate(batches):
            end = batch["offset"] + batch["length"]
            if end > size:
                raise ShardError(self.path, index, f"truncated: the record batch ends at byte {end} "
                                 f"but the file has {size} bytes (expected {self.entry['num_bytes']})")
        if size != self.entry["num_bytes"]:
            raise ShardError(self.path, None, f"the file has {size} bytes, the manifest records "
                             f"{self.entry['num_bytes']}")
        try:
            schema = ipc.read_schema(pa.BufferReader(self._buffer))
        except (pa.ArrowInvalid, OSError) as err:
            raise ShardError(self.path, None, f"unreadable schema ({err})") from err
        if not schema.equals(self.schema):
            raise ShardError(self.path, None, f"schema {schema} differs from the expected {self.schema}")
        for index, batch in enumerate(batches):
            offset, length = batch["offset"], batch["length"]
            if check_crc and zlib.crc32(self.bytes[offset:offset + length]) != batch["crc32"]:
                raise ShardError(self.path, index, "checksum mismatch: the bytes were modified")
            try:
                record_batch = self.read_batch(index)
                record_batch.validate(full=True)
            except (pa.ArrowException, OSError, ValueError, EOFError) as err:
                raise ShardError(self.path, index, f"unreadable record batch ({err})") from err
            if record_batch.num_rows != batch["num_rows"]:
                raise ShardError(self.path, index, f"{record_batch.num_rows} rows, the manifest records "
                                 f"{batch['num_rows']}")

    def read_batch(self, index: int) -> pa.RecordBatch:
        batch = self.entry["record_batches"][index]
        message = ipc.read_message(self._buffer.slice(batch["offset"], batch["length"]))
        return ipc.read_record_batch(message, self.schema)

    def block(self, index: int, difficulty_column: Optional[str]) -> Block:
        """The numpy view of record batch `index` (zero-copy into the mapping)."""
        batch = self.read_batch(index)
        tokens = batch.column("tokens")
        values_buffer = tokens.values.buffers()[1]
        # The batch is a zero-copy slice of the mapping, so its values live at
        # a fixed byte offset inside the file.
        values_offset = values_buffer.address - self._buffer.address
        itemsize = self.token_dtype.itemsize
        assert 0 <= values_offset <= len(self.bytes) and values_offset % itemsize == 0, \
            "record batch is not an aligned view of the mapped shard"
        list_offsets = tokens.offsets.to_numpy().astype(np.int64)
        difficulty = None
        if difficulty_column is not None:
            difficulty = batch.column(difficulty_column).to_numpy()
        return Block(
            doc_ids=batch.column("doc_id").to_numpy(),
            n_tokens=np.diff(list_offsets),
            token_starts=values_offset // itemsize + tokens.values.offset + list_offsets[:-1],
            difficulty=difficulty,
        )
