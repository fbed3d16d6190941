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

# A slice of one document: (shard index, index of its first token in the shard's token view, tokens, doc_id).
Segment = tuple[int, int, int, int]


class Packer:
    """Cuts the document sequence into global batches.

    Args:
        seq_len: L.
        global_batch_size: G.
        carry: (document, tokens of it already used) to resume from.
    """

    def __init__(self, seq_len: int, global_batch_size: int, carry: Optional[tuple[DocRef, int]] = None) -> None:
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.carry = carry

    def plan(self, next_document: Callable[[], Optional[DocRef]]) -> Optional[list[Segment]]:
        """Segments covering the next global batch's G*L + 1 tokens; None when the documents run out.

        The last token is the first token of the next batch: it is planned
        here but stays in the carry.
        """
        segments: list[Segment] = []
        needed = self.seq_len * self.global_batch_size
        document, used = self.carry if self.carry is not None else (None, 0)
        while True:
            if document is None or used == document[2]:
                document, used = next_document(), 0
                if document is None:
                    self.carry = None
                    return None
            shard, token_start, num_tokens, doc_id = document
            if needed == 0:
                segments.append((shard, token_start + used, 1, doc_id))
                self.carry = (document, used)
                return segments
            take = min(num_tokens - used, needed)
            segments.append((shard, token_start + used, take, doc_id))
            used += take
            needed -= take


def materialize(segments: list[Segment], shards: list[MappedShard], start: int, length: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and doc_ids of planned tokens [start, start + length) as int64 arrays of N = length."""
    tokens_N = np.empty(length, dtype=np.int64)
    end = start + length
    doc_ids, counts = [], []
    position = 0  # planned-token index of the current segment's first token
    for shard, token_start, count, doc_id in segments:
        segment_end = position + count
        if segment_end > start:
            lo, hi = max(position, start), min(segment_end, end)
            first = token_start + lo - position
            tokens_N[lo - start:hi - start] = shards[shard].token_view[first:first + hi - lo]
            doc_ids.append(doc_id)
            counts.append(hi - lo)
            if segment_end >= end:
                break
        position = segment_end
    doc_ids_N = np.repeat(np.array(doc_ids, dtype=np.int64), counts)
    return tokens_N, doc_ids_N
