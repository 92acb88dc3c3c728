"""KV-cache block bookkeeping: a free list, per-block reference counts and block tables.

The device KV cache is one array `[kv_heads, num_blocks, block_size, head_dim]`; a sequence's
`block_table` lists which blocks hold its tokens, token `t` living in block
`block_table[t // block_size]` at slot `t % block_size`.

Block 0 is reserved: padded token slots of a bucketed batch write their K/V into block 0, so it is
never handed to a sequence and a padded write can never clobber live data.

Blocks carry reference counts rather than an owner so that several sequences can share a prefix
(`fork`, for n > 1). A sequence about to write into a shared, partly filled block first gets its
own copy (`copy_on_write`); the device copies the contents before the step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from jaxinfer.engine.sequence import Sequence

PAD_BLOCK = 0  # the padding target; never allocated


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref_counts = [0] * num_blocks
        # FIFO reuse: a just-freed block is handed out last, which makes a stale-read bug in the
        # device code show up as wrong tokens rather than hiding behind freshly written K/V.
        self._free_blocks: deque[int] = deque(range(1, num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks a table needs to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_tokens_total: int) -> int:
        """How many more blocks `seq` needs so its table covers `num_tokens_total` tokens."""
        return max(0, self.blocks_for_tokens(num_tokens_total) - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free_blocks)

    def ensure_capacity(self, seq: Sequence, num_tokens_total: int) -> bool:
        """Grow `seq.block_table` to cover `num_tokens_total` tokens.

        All or nothing: returns False and changes nothing when the free list is too short, so the
        scheduler can decide whom to preempt without undoing a half-done allocation.
        """
        needed = self.blocks_needed(seq, num_tokens_total)
        if not self.can_allocate(needed):
            return False
        for _ in range(needed):
            block_id = self._free_blocks.popleft()
            self._ref_counts[block_id] = 1
            seq.block_table.append(block_id)
        return True

    def fork(self, src_table: list[int]) -> list[int]:
        """Share every block of `src_table`; returns a new table (a new list) of the same blocks."""
        for block_id in src_table:
            if self._ref_counts[block_id] <= 0:
                raise ValueError(f"cannot fork block {block_id}: it is not allocated")
            self._ref_counts[block_id] += 1
        return list(src_table)

    def copy_on_write(self, seq: Sequence, block_index: int) -> tuple[int, int] | None:
        """Make `seq.block_table[block_index]` private before `seq` writes into it.

        -> (src, dst) blocks whose contents the device must copy; (b, b) when the block was
        private already (nothing to copy); None, changing nothing, when no block is free.
        """
        src = seq.block_table[block_index]
        if self._ref_counts[src] == 1:
            return src, src
        if not self._free_blocks:
            return None
        dst = self._free_blocks.popleft()
        self._ref_counts[dst] = 1
        self._ref_counts[src] -= 1
        seq.block_table[block_index] = dst
        return src, dst

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; a block returns to the free list when nobody references it."""
        for block_id in seq.block_table:
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free_blocks.append(block_id)
            elif self._ref_counts[block_id] < 0:
                raise AssertionError(f"block {block_id} freed more often than allocated")
        seq.block_table = []

    def check_invariants(self, block_tables: Iterable[list[int]] | None = None) -> None:
        """Assert the free list and reference counts agree (for tests and debugging).

        With `block_tables` (every live table), also assert each block's reference count equals
        the number of tables that hold it, i.e. no leaked and no dangling blocks.
        """
        free = list(self._free_blocks)
        assert len(free) == len(set(free)), "duplicate block in the free list"
        assert PAD_BLOCK not in free and self._ref_counts[PAD_BLOCK] == 0, "block 0 handed out"
        free_set = set(free)
        for block_id in range(1, self.num_blocks):
            ref = self._ref_counts[block_id]
            if block_id in free_set:
                assert ref == 0, f"free block {block_id} has ref count {ref}"
            else:
                assert ref > 0, f"block {block_id} is neither free nor referenced"
        if block_tables is not None:
            counts = [0] * self.num_blocks
            for table in block_tables:
                assert len(table) == len(set(table)), f"block repeated within a table {table}"
                for block_id in table:
                    counts[block_id] += 1
            assert counts == self._ref_counts, "ref counts disagree with the live block tables"
