"""Stage 5, curriculum: which documents are eligible at a step, and in what order they come.

`pace(step, curriculum)` is DeepSpeed's `CurriculumScheduler.get_difficulty`
for `fixed_linear`, `fixed_root` and `fixed_discrete`, on a percentile scale
(max_difficulty = 100), plus `none` (always 100). One deliberate difference:
from `total_curriculum_step` on, the pace is 100 even when `difficulty_step`
does not divide 100 (DeepSpeed would stay below its max forever), so that
after the curriculum every document is eligible.

NOTE: the order of documents, a pure function of (seed, step).
 1. Passes. The stream walks the record batches ("blocks") of the split pass
    after pass; pass p visits the blocks in a permutation drawn from
    (seed, p) and the rows of each block in a permutation drawn from
    (seed, p, block). A document whose percentile is above the pace of the
    step that reaches it is passed over for this pass.
 2. Shuffle buffer. Eligible documents enter a buffer of `capacity`
    documents; each document handed to the packer is drawn uniformly from the
    full buffer (the random numbers are indexed by the draw count, so no RNG
    state has to be saved), and the next eligible document takes its place.
 3. Position. Everything above is determined by (pass, block position, row
    position), the buffer's contents and the draw count: that small state is
    what a checkpoint saves, and restoring it resumes the exact sequence.
Nothing here depends on the rank or the number of ranks.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from data_pipeline.config import CurriculumConfig
from data_pipeline.shards import Block, MappedShard

# A document as the stream hands it on: (shard index, index of its first token
# in the shard's token view, number of tokens, doc_id).
DocRef = tuple[int, int, int, int]

_UNIFORMS_PER_DRAW_CHUNK = 4096


def pace(step: int, curriculum: CurriculumConfig) -> float:
    """The highest eligible difficulty percentile at training step `step` (0-based)."""
    schedule = curriculum.schedule
    if schedule == "none":
        return 100.0
    if schedule == "fixed_discrete":
        if step > curriculum.max_step[-1]:
            return curriculum.difficulty[-1]
        for difficulty, max_step in zip(curriculum.difficulty, curriculum.max_step):
            if step <= max_step:
                return difficulty
    if step >= curriculum.total_curriculum_step:
        return 100.0
    root_degree = 1 if schedule == "fixed_linear" else curriculum.root_degree
    min_difficulty, step_size = curriculum.min_difficulty, curriculum.difficulty_step
    fraction = (float(step) / curriculum.total_curriculum_step) ** (1.0 / root_degree)
    difficulty = math.floor(fraction * (100.0 - min_difficulty) + min_difficulty)
    difficulty -= difficulty % step_size
    difficulty = max(difficulty, -(-min_difficulty // step_size) * step_size)
    return float(min(difficulty, 100.0))


class DocumentStream:
    """The documents of a split, pass after pass, filtered by the pace.

    Args:
        shards: the usable shards of the split.
        blocks: (shard index, record batch index) of every block, in manifest order.
        seed: permutation seed.
        shuffle: permute blocks and rows (training) or keep manifest order.
        loop: start a new pass at the end (training) or stop (validation).
        difficulty_column: percentile column of the curriculum metric, or None.
        state: (pass, block position, row position) to resume from.
    """

    def __init__(self, shards: list[MappedShard], blocks: list[tuple[int, int]], *, seed: int, shuffle: bool,
                 loop: bool, difficulty_column: Optional[str], state: tuple[int, int, int] = (0, 0, 0)) -> None:
        self.shards = shards
        self.blocks = blocks
        self.seed = seed
        self.shuffle = shuffle
        self.loop = loop
        self.difficulty_column = difficulty_column
        self.pass_index, self.block_pos, self.row_pos = state
        self._order_pass: Optional[int] = None
        self._order: Optional[np.ndarray] = None
        self._block_key: Optional[tuple[int, int]] = None
        self._eligible_pace: Optional[float] = None

    def state(self) -> tuple[int, int, int]:
        return self.pass_index, self.block_pos, self.row_pos

    def next(self, pace_now: float) -> Optional[DocRef]:
        """The next document with percentile <= `pace_now`; None at the end of a non-looping stream."""
        if pace_now == self._eligible_pace and self._next_eligible < len(self._eligible):
            # Fast path: the next eligible row of the current block.
            position = self._eligible[self._next_eligible]
            self._next_eligible += 1
            self.row_pos = position + 1
            return self._docs[position]
        blocks_without_document = 0
        while True:
            if self.block_pos == len(self.blocks):
                if not self.loop:
                    return None
                self.pass_index, self.block_pos, self.row_pos = self.pass_index + 1, 0, 0
            self._load_block()
            if self._eligible_pace != pace_now:
                self._select_eligible(pace_now)
            if self._next_eligible < len(self._eligible):
                position = self._eligible[self._next_eligible]
                self._next_eligible += 1
                self.row_pos = position + 1
                return self._docs[position]
            self.block_pos, self.row_pos = self.block_pos + 1, 0
            self._eligible_pace = None
            blocks_without_document += 1
            # The rest of this pass and all of the next one, in its own block order.
            if blocks_without_document > 2 * len(self.blocks):
                raise RuntimeError(f"no document of the split has a {self.difficulty_column} at or below the "
                                   f"pace {pace_now}: raise min_difficulty")

    def _load_block(self) -> None:
        if self._order_pass != self.pass_index:
            count = len(self.blocks)
            self._order = (np.random.default_rng([self.seed, 0, self.pass_index]).permutation(count)
                           if self.shuffle else np.arange(count))
            self._order_pass = self.pass_index
        block_index = int(self._order[self.block_pos])
        if self._block_key == (self.pass_index, self.block_pos):
            return
        shard_index, batch_index = self.blocks[block_index]
        block: Block = self.shards[shard_index].block(batch_index, self.difficulty_column)
        rows = len(block.doc_ids)
        permutation = (np.random.default_rng([self.seed, 1, self.pass_index, block_index]).permutation(rows)
                       if self.shuffle else np.arange(rows))
        # Python tuples: the hot loop hands documents on one at a time.
        self._docs: list[DocRef] = list(zip([shard_index] * rows, block.token_starts[permutation].tolist(),
                                            block.n_tokens[permutation].tolist(),
                                            block.doc_ids[permutation].tolist()))
        self._difficulty = None if block.difficulty is None else block.difficulty[permutation]
        self._block_key = (self.pass_index, self.block_pos)
        self._eligible_pace = None

    def _select_eligible(self, pace_now: float) -> None:
        if self._difficulty is None:
            self._eligible = list(range(self.row_pos, len(self._docs)))
        else:
            self._eligible = (self.row_pos + np.flatnonzero(self._difficulty[self.row_pos:] <= pace_now)).tolist()
        self._next_eligible = 0
        self._eligible_pace = pace_now


class ShuffleBuffer:
    """A bounded shuffle buffer over a document stream (capacity 0: no shuffling).

    Args:
        capacity: documents held.
        seed: seed of the draws.
        items: contents to resume from.
        draws: draws made so far (indexes the random numbers).
    """

    def __init__(self, capacity: int, seed: int, items: Optional[list[DocRef]] = None, draws: int = 0) -> None:
        self.capacity = capacity
        self.seed = seed
        self.items: list[DocRef] = list(items or [])
        self.draws = draws
        self._uniform_chunk = -1
        self._uniforms: list[float] = []

    def pop(self, refill: Callable[[], Optional[DocRef]]) -> Optional[DocRef]:
        """Fills the buffer from `refill`, then removes and returns a uniformly drawn document."""
        if self.capacity == 0:
            return refill()
        items = self.items
        while len(items) < self.capacity:
            item = refill()
            if item is None:
                break
            items.append(item)
        if not items:
            return None
        draw = self.draws
        chunk = draw // _UNIFORMS_PER_DRAW_CHUNK
        if chunk != self._uniform_chunk:
            self._uniforms = np.random.default_rng([self.seed, 2, chunk]).random(_UNIFORMS_PER_DRAW_CHUNK).tolist()
            self._uniform_chunk = chunk
        index = int(self._uniforms[draw % _UNIFORMS_PER_DRAW_CHUNK] * len(items))
        self.draws = draw + 1
        item = items[index]
        items[index] = items[-1]
        items.pop()
        return item
