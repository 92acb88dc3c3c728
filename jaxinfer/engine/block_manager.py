"""KV-cache block bookkeeping: free blocks, reference counts, block tables, and the prefix cache.

The device KV cache is one array `[kv_heads, num_blocks, block_size, head_dim]`; a sequence's
`block_table` lists which blocks hold its tokens, token `t` living in block
`block_table[t // block_size]` at slot `t % block_size`.

Block 0 is reserved: padded token slots of a bucketed batch write their K/V into block 0, so it is
never handed to a sequence and a padded write can never clobber live data.

Blocks carry reference counts rather than an owner so that several sequences can share them: a
prompt's blocks among its n samples (`fork`), and any full block whose contents another sequence
computed before (the prefix cache). A sequence about to write into a shared, partly filled block
first gets its own copy (`copy_on_write`); the device copies the contents before the step.

Prefix caching (vLLM V1's design). A full block is named by a hash chain, `hash(parent's hash,
its token ids, extra key)`, so equal hashes mean equal tokens at equal positions after an equal
prefix, hence equal K/V. Once a block is full and computed, `cache_full_blocks` records it in a
hash -> block map. When its last reference goes, a cached block is not wiped: it joins an LRU queue
of evictable blocks and keeps its contents until a free block is needed and no never-cached one
is left, and a new sequence whose leading blocks hash the same takes them back (`lookup`,
`allocate`). Only full blocks are ever cached, and a sequence only writes at positions past what it
computed or reused, so a cached block is never written again while cached.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable
from collections.abc import Sequence as SequenceOf

from jaxinfer.engine.sequence import Sequence

PAD_BLOCK = 0  # the padding target; never allocated


def hash_block(parent: bytes | None, token_ids: SequenceOf[int], extra_key: bytes = b"") -> bytes:
    """The chain hash of one full block: SHA-256 (as vLLM's default) of the parent's hash, the
    block's token ids and any extra key that changes the K/V contents (adapters, a cache salt;
    none exist yet). A cryptographic hash, because a collision would silently serve another
    prompt's K/V."""
    digest = hashlib.sha256(parent or b"\0" * 32)
    digest.update(array("q", token_ids).tobytes())
    digest.update(extra_key)
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._ref_counts = [0] * num_blocks
        # Free blocks holding nothing worth keeping, FIFO: a just-freed block is handed out last,
        # which makes a stale-read bug in the device code show up as wrong tokens.
        self._free_blocks: deque[int] = deque(range(1, num_blocks))
        # Free blocks that still hold a cached prefix, least recently freed first (evicted first).
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[bytes, int] = {}  # block hash -> block holding those tokens
        self._block_hash: list[bytes | None] = [None] * num_blocks
        # Prefix-cache counters in tokens, as vLLM reports them: looked up at admission, reused.
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody references (evictable cached blocks included)."""
        return len(self._free_blocks) + len(self._evictable)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks referenced by some sequence (vLLM's KV-cache usage)."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks a table needs to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_tokens_total: int) -> int:
        """How many more blocks `seq` needs so its table covers `num_tokens_total` tokens."""
        return max(0, self.blocks_for_tokens(num_tokens_total) - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    # ---- prefix cache --------------------------------------------------------------------------

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """`seq`'s first `num_blocks` block hashes, computing the missing ones (their tokens must
        be final: prompt tokens, or outputs already fed to the model)."""
        hashes, tokens, size = seq.block_hashes, seq.all_token_ids, self.block_size
        while len(hashes) < num_blocks:
            index = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, tokens[index * size : (index + 1) * size]))
        return hashes[:num_blocks]

    def lookup(self, seq: Sequence, max_tokens: int) -> list[int]:
        """The cached blocks holding `seq`'s longest cached prefix of at most `max_tokens` tokens
        (whole blocks only). Changes nothing: pass the result to `allocate`."""
        if not self.enable_caching:
            return []
        blocks = []
        for block_hash in self._hashes(seq, max_tokens // self.block_size):
            block = self._cached.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Record `seq`'s blocks that are full and computed (`num_computed_tokens`) in the prefix
        cache. A hash cached already (another sequence computed the same tokens) keeps its block;
        this copy stays private and is freed normally."""
        if not self.enable_caching:
            return
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if seq.num_cached_blocks >= full:
            return
        hashes = self._hashes(seq, full)
        for index in range(seq.num_cached_blocks, full):
            block = seq.block_table[index]
            if hashes[index] not in self._cached and self._block_hash[block] is None:
                self._cached[hashes[index]] = block
                self._block_hash[block] = hashes[index]
        seq.num_cached_blocks = full

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (vLLM's `reset_prefix_cache`). Refused (False) while any
        sequence holds blocks, as vLLM does: their blocks would stay cached behind the reset."""
        if self.num_free_blocks != self.num_usable_blocks:
            return False
        for block in self._evictable:
            self._block_hash[block] = None
            self._free_blocks.append(block)
        self._evictable.clear()
        self._cached.clear()
        return True

    # ---- allocation ----------------------------------------------------------------------------

    def _take_free(self) -> int:
        """A free block for new contents: a never-cached one first, else evict the LRU one."""
        if self._free_blocks:
            block = self._free_blocks.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._block_hash[block]]
            self._block_hash[block] = None
        self._ref_counts[block] = 1
        return block

    def allocate(self, seq: Sequence, cached: list[int], num_tokens_total: int) -> bool:
        """Give a sequence without blocks the `cached` blocks (from `lookup`) as its first ones,
        plus new blocks up to `num_tokens_total` tokens; counts the lookup in the hit rate.

        All or nothing, like `ensure_capacity`: False, changing nothing, if the free blocks do
        not cover the new ones plus the cached ones nobody else references.
        """
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        new = max(0, self.blocks_for_tokens(num_tokens_total) - len(cached))
        revived = sum(1 for block in cached if self._ref_counts[block] == 0)
        if not self.can_allocate(new + revived):
            return False
        for block in cached:
            if self._ref_counts[block] == 0:
                del self._evictable[block]
            self._ref_counts[block] += 1
        seq.block_table = list(cached)
        seq.num_cached_blocks = len(cached)
        for _ in range(new):
            seq.block_table.append(self._take_free())
        if self.enable_caching:
            self.num_queried_tokens += seq.num_tokens
            self.num_hit_tokens += len(cached) * self.block_size
        return True

    def ensure_capacity(self, seq: Sequence, num_tokens_total: int) -> bool:
        """Grow `seq.block_table` to cover `num_tokens_total` tokens.

        All or nothing: returns False and changes nothing when the free blocks are too few, so
        the scheduler can decide whom to preempt without undoing a half-done allocation.
        """
        needed = self.blocks_needed(seq, num_tokens_total)
        if not self.can_allocate(needed):
            return False
        for _ in range(needed):
            seq.block_table.append(self._take_free())
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
        assert self._block_hash[src] is None, f"block {src} is cached: it must never be written"
        if self._ref_counts[src] == 1:
            return src, src
        if not self.num_free_blocks:
            return None
        dst = self._take_free()
        self._ref_counts[src] -= 1
        seq.block_table[block_index] = dst
        return src, dst

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references. A block nobody references becomes free; a cached one stays
        cached but evictable. Last blocks first, so a prefix's tail is evicted before its head
        (the head is the part other prompts are likelier to share)."""
        for block_id in reversed(seq.block_table):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                if self._block_hash[block_id] is None:
                    self._free_blocks.append(block_id)
                else:
                    self._evictable[block_id] = None
            elif self._ref_counts[block_id] < 0:
                raise AssertionError(f"block {block_id} freed more often than allocated")
        seq.block_table = []
        seq.num_cached_blocks = 0

    def check_invariants(self, block_tables: Iterable[list[int]] | None = None) -> None:
        """Assert the free lists, the cache map and reference counts agree (tests, debugging).

        With `block_tables` (every live table), also assert each block's reference count equals
        the number of tables that hold it, i.e. no leaked and no dangling blocks.
        """
        free, evictable = list(self._free_blocks), list(self._evictable)
        assert len(free) == len(set(free)), "duplicate block in the free list"
        assert not set(free) & set(evictable), "block both free and evictable"
        assert PAD_BLOCK not in free + evictable and self._ref_counts[PAD_BLOCK] == 0
        free_set = set(free) | set(evictable)
        for block_id in range(1, self.num_blocks):
            ref = self._ref_counts[block_id]
            if block_id in free_set:
                assert ref == 0, f"free block {block_id} has ref count {ref}"
            else:
                assert ref > 0, f"block {block_id} is neither free nor referenced"
        for block_hash, block_id in self._cached.items():
            assert self._block_hash[block_id] == block_hash, f"cache map disagrees at {block_id}"
        assert sum(h is not None for h in self._block_hash) == len(self._cached)
        assert all(self._block_hash[b] is not None for b in evictable), "uncached evictable"
        assert all(self._block_hash[b] is None for b in free), "cached block in the free list"
        if block_tables is not None:
            counts = [0] * self.num_blocks
            for table in block_tables:
                assert len(table) == len(set(table)), f"block repeated within a table {table}"
                for block_id in table:
                    counts[block_id] += 1
            assert counts == self._ref_counts, "ref counts disagree with the live block tables"
