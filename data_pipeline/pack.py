"""Stage 6, pack: documents -> global batches of sequences of seq_len + 1 tokens.

The documents handed on by the curriculum are concatenated into one token
stream; global batch t holds sequences t*G .. t*G + G - 1, and sequence i is
stream tokens [i*L, i*L + L + 1) (inputs = the first L, targets = the last L),
so consecutive sequences share one token and every token is a target once.

Planning a global batch needs only document lengths: `Packer.plan` returns
the segments (document slices) that cover its G*L + 1 tokens. Each rank then
copies only its own rows' tokens (`materialize`), straight from the
memory-mapped shards into the output arrays.

Legend: B = local batch, G = global batch, L = seq_len, N = tokens copied for one rank (B * L + 1).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from data_pipeline.curriculum import DocRef
from data_pipeline.shards import MappedShard

# A slice of one document: (shard index, byte offset of its first token, tokens, doc_id).
Segment = tuple[int, int, int, int]


class Packer:
    """Cuts the document sequence into global batches.

    Args:
        seq_len: L.
        global_batch_size: G.
        token_itemsize: bytes per stored token.
        carry: (document, tokens of it already used) to resume from.
    """

    def __init__(self, seq_len: int, global_batch_size: int, token_itemsize: int,
                 carry: Optional[tuple[DocRef, int]] = None) -> None:
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.token_itemsize = token_itemsize
        self.carry = carry

    def plan(self, next_document: Callable[[], Optional[DocRef]]) -> Optional[list[Segment]]:
        """Segments covering the next global batch's G*L + 1 tokens; None when the documents run out.

        The last token is the first token of the next batch: it is planned
        here but stays in the carry.
        """
        segments: list[Segment] = []
        needed = self.seq_len * self.global_batch_size
        while needed > 0:
            if not self._ensure_carry(next_document):
                return None
            (shard, byte_offset, num_tokens, doc_id), used = self.carry
            take = min(num_tokens - used, needed)
            segments.append((shard, byte_offset + used * self.token_itemsize, take, doc_id))
            self.carry = (self.carry[0], used + take)
            needed -= take
        if not self._ensure_carry(next_document):
            return None
        (shard, byte_offset, _, doc_id), used = self.carry
        segments.append((shard, byte_offset + used * self.token_itemsize, 1, doc_id))
        return segments

    def _ensure_carry(self, next_document: Callable[[], Optional[DocRef]]) -> bool:
        if self.carry is None or self.carry[1] == self.carry[0][2]:
            document = next_document()
            if document is None:
                return False
            self.carry = (document, 0)
        return True


def materialize(segments: list[Segment], shards: list[MappedShard], start: int, length: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and doc_ids of planned tokens [start, start + length) as int64 arrays of N = length."""
    tokens_N = np.empty(length, dtype=np.int64)
    doc_ids_N = np.empty(length, dtype=np.int64)
    end = start + length
    position = 0  # planned-token index of the current segment's first token
    for shard, byte_offset, count, doc_id in segments:
        segment_end = position + count
        if segment_end > start and position < end:
            lo, hi = max(position, start), min(segment_end, end)
            itemsize = shards[shard].token_dtype.itemsize
            tokens_N[lo - start:hi - start] = shards[shard].tokens(byte_offset + (lo - position) * itemsize, hi - lo)
            doc_ids_N[lo - start:hi - start] = doc_id
        position = segment_end
        if position >= end:
            break
    return tokens_N, doc_ids_N
