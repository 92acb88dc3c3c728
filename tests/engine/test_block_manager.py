"""BlockManager: unit tests plus a stateful hypothesis model of allocate / grow / fork / free."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.sequence import Sequence


def make_seq(seq_id: int = 0) -> Sequence:
    return Sequence(seq_id=seq_id, prompt_token_ids=[1, 2, 3], max_tokens=4)


@pytest.mark.parametrize(
    ("num_blocks", "block_size", "field"),
    [(1, 16, "num_blocks"), (0, 16, "num_blocks"), (8, 0, "block_size")],
)
def test_constructor_validates(num_blocks: int, block_size: int, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        BlockManager(num_blocks, block_size)


def test_block_zero_is_reserved() -> None:
    bm = BlockManager(num_blocks=5, block_size=4)
    assert bm.num_usable_blocks == 4 and bm.num_free_blocks == 4
    seq = make_seq()
    assert bm.ensure_capacity(seq, 16)
    assert sorted(seq.block_table) == [1, 2, 3, 4]
    assert bm.num_free_blocks == 0
    bm.check_invariants([seq.block_table])


def test_blocks_needed_counts_partial_blocks() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    seq = make_seq()
    assert bm.blocks_needed(seq, 0) == 0
    assert bm.blocks_needed(seq, 1) == 1
    assert bm.blocks_needed(seq, 4) == 1
    assert bm.blocks_needed(seq, 5) == 2
    assert bm.ensure_capacity(seq, 5)
    assert len(seq.block_table) == 2
    assert bm.blocks_needed(seq, 8) == 0
    assert bm.blocks_needed(seq, 9) == 1
    assert bm.blocks_needed(seq, 3) == 0  # never negative: tables do not shrink


def test_ensure_capacity_is_all_or_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)  # 3 usable
    a, b = make_seq(0), make_seq(1)
    assert bm.ensure_capacity(a, 4)  # 2 blocks
    table_before = list(b.block_table)
    assert not bm.can_allocate(2)
    assert not bm.ensure_capacity(b, 4)  # needs 2, only 1 free
    assert b.block_table == table_before and bm.num_free_blocks == 1
    assert bm.ensure_capacity(b, 2)
    bm.check_invariants([a.block_table, b.block_table])


def test_free_returns_blocks_and_clears_table() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    seq = make_seq()
    bm.ensure_capacity(seq, 10)
    bm.free(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 5
    bm.free(seq)  # freeing an empty table is a no-op
    bm.check_invariants([])


def test_fork_shares_blocks_until_last_reference_is_freed() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    parent, child = make_seq(0), make_seq(1)
    bm.ensure_capacity(parent, 8)
    child.block_table = bm.fork(parent.block_table)
    assert child.block_table == parent.block_table and child.block_table is not parent.block_table
    assert all(bm.ref_count(b) == 2 for b in parent.block_table)
    assert bm.num_free_blocks == 3
    bm.ensure_capacity(child, 12)  # the child grows on a fresh block of its own
    bm.check_invariants([parent.block_table, child.block_table])
    bm.free(parent)
    assert bm.num_free_blocks == 2  # shared blocks are still held by the child
    bm.free(child)
    assert bm.num_free_blocks == 5
    bm.check_invariants([])


def test_fork_of_unallocated_block_is_rejected() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="not allocated"):
        bm.fork([1])


def test_check_invariants_detects_leak() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq()
    bm.ensure_capacity(seq, 4)
    with pytest.raises(AssertionError):
        bm.check_invariants([])  # the block is referenced but no table holds it


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate/grow/fork/free against a model: ref counts always match the live tables."""

    def __init__(self) -> None:
        super().__init__()
        self.bm: BlockManager | None = None
        self.seqs: dict[int, tuple[Sequence, int]] = {}  # seq_id -> (seq, tokens covered)
        self.next_id = 0

    @precondition(lambda self: self.bm is None)
    @rule(num_blocks=st.integers(2, 24), block_size=st.integers(1, 8))
    def init(self, num_blocks: int, block_size: int) -> None:
        self.bm = BlockManager(num_blocks, block_size)

    def _expected_free(self) -> int:
        used = {b for seq, _ in self.seqs.values() for b in seq.block_table}
        return self.bm.num_usable_blocks - len(used)

    @precondition(lambda self: self.bm is not None)
    @rule(num_tokens=st.integers(0, 80))
    def allocate(self, num_tokens: int) -> None:
        seq = make_seq(self.next_id)
        self.next_id += 1
        needed = self.bm.blocks_needed(seq, num_tokens)
        ok = self.bm.ensure_capacity(seq, num_tokens)
        assert ok == (needed <= self._expected_free())
        if ok:
            self.seqs[seq.seq_id] = (seq, num_tokens)
        else:
            assert seq.block_table == []

    @precondition(lambda self: self.bm is not None and self.seqs)
    @rule(index=st.integers(0, 10_000), extra=st.integers(0, 40))
    def grow(self, index: int, extra: int) -> None:
        seq, covered = self._pick(index)
        before = list(seq.block_table)
        free_before = self.bm.num_free_blocks
        ok = self.bm.ensure_capacity(seq, covered + extra)
        if ok:
            assert len(seq.block_table) * self.bm.block_size >= covered + extra
            assert seq.block_table[: len(before)] == before
            self.seqs[seq.seq_id] = (seq, covered + extra)
        else:
            assert seq.block_table == before and self.bm.num_free_blocks == free_before

    @precondition(lambda self: self.bm is not None and self.seqs)
    @rule(index=st.integers(0, 10_000))
    def fork(self, index: int) -> None:
        parent, covered = self._pick(index)
        child = make_seq(self.next_id)
        self.next_id += 1
        free_before = self.bm.num_free_blocks
        child.block_table = self.bm.fork(parent.block_table)
        assert self.bm.num_free_blocks == free_before
        self.seqs[child.seq_id] = (child, covered)

    @precondition(lambda self: self.bm is not None and self.seqs)
    @rule(index=st.integers(0, 10_000))
    def free(self, index: int) -> None:
        seq, _ = self._pick(index)
        del self.seqs[seq.seq_id]
        self.bm.free(seq)
        assert seq.block_table == []
        assert self.bm.num_free_blocks == self._expected_free()

    def _pick(self, index: int) -> tuple[Sequence, int]:
        keys = sorted(self.seqs)
        return self.seqs[keys[index % len(keys)]]

    @invariant()
    def consistent(self) -> None:
        if self.bm is None:
            return
        self.bm.check_invariants([seq.block_table for seq, _ in self.seqs.values()])
        assert self.bm.num_free_blocks == self._expected_free()
        assert all(0 not in seq.block_table for seq, _ in self.seqs.values())

    def teardown(self) -> None:
        if self.bm is None:
            return
        for seq, _ in self.seqs.values():
            self.bm.free(seq)
        assert self.bm.num_free_blocks == self.bm.num_usable_blocks
        self.bm.check_invariants([])


BlockManagerMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=30, deadline=None
)
TestBlockManagerMachine = BlockManagerMachine.TestCase
