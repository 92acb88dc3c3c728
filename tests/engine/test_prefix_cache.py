"""Prefix caching in the block manager and scheduler (host only, no JAX): hash chains, reuse,
LRU eviction of unreferenced cached blocks, and a hypothesis state machine of the caching rules."""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jaxinfer.engine.block_manager import BlockManager, hash_block
from jaxinfer.engine.scheduler import Scheduler
from jaxinfer.engine.sequence import Sequence


def seq_of(seq_id: int, tokens: list[int], max_tokens: int = 4) -> Sequence:
    return Sequence(seq_id=seq_id, prompt_token_ids=tokens, max_tokens=max_tokens)


def compute(bm: BlockManager, seq: Sequence, num_tokens: int) -> None:
    """Pretend the device computed `seq`'s first `num_tokens` tokens."""
    assert bm.ensure_capacity(seq, num_tokens)
    seq.num_computed_tokens = num_tokens
    bm.cache_full_blocks(seq)


def admit(bm: BlockManager, seq: Sequence) -> int:
    """Admit with reuse, as the scheduler does; -> the tokens served from cache."""
    cached = bm.lookup(seq, seq.num_tokens - 1)
    assert bm.allocate(seq, cached, seq.num_tokens)
    return len(cached) * bm.block_size


def test_hash_chain_depends_on_the_whole_prefix() -> None:
    block = [5, 6, 7, 8]
    first = hash_block(None, [1, 2, 3, 4])
    assert hash_block(first, block) == hash_block(first, list(block))
    assert hash_block(first, block) != hash_block(hash_block(None, [1, 2, 3, 9]), block)
    assert hash_block(first, block) != hash_block(None, block)  # same tokens, other position
    assert hash_block(first, block) != hash_block(first, block, extra_key=b"adapter")


def test_reuse_serves_full_computed_blocks_only() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq_of(0, list(range(10)))
    compute(bm, a, 10)  # blocks 0-1 full, block 2 holds 2 tokens
    assert bm.num_cached_blocks == 2
    b = seq_of(1, list(range(10)) + [99])
    assert admit(bm, b) == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert bm.ref_count(a.block_table[0]) == 2
    bm.check_invariants([a.block_table, b.block_table])
    assert (bm.num_queried_tokens, bm.num_hit_tokens) == (11, 8)


def test_the_last_token_is_always_computed() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq_of(0, list(range(8)))
    compute(bm, a, 8)
    again = seq_of(1, list(range(8)))  # the whole prompt is cached: reuse stops one block short
    assert admit(bm, again) == 4


def test_a_different_token_breaks_the_chain() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    compute(bm, seq_of(0, list(range(12))), 12)
    other = seq_of(1, [0, 1, 2, 3, 4, 5, 6, 0, 8, 9, 10, 11, 12])
    assert admit(bm, other) == 4


def test_freed_cached_blocks_stay_until_evicted_least_recent_first() -> None:
    bm = BlockManager(num_blocks=9, block_size=2)  # 8 usable
    old, new = seq_of(0, [1, 2, 3, 4]), seq_of(1, [7, 8, 9, 10])
    compute(bm, old, 4)
    compute(bm, new, 4)
    bm.free(old)  # freed first: evicted first
    bm.free(new)
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 4
    filler = seq_of(2, [0])
    assert bm.ensure_capacity(filler, 10)  # the 4 never-cached blocks, then old's tail block
    assert bm.num_cached_blocks == 3
    bm.free(filler)
    assert admit(bm, seq_of(3, [1, 2, 3, 4, 5])) == 2  # old's head block is still cached
    assert admit(bm, seq_of(4, [7, 8, 9, 10, 11])) == 4  # new's blocks untouched
    bm.check_invariants()


def test_never_cached_free_blocks_go_before_any_eviction() -> None:
    bm = BlockManager(num_blocks=6, block_size=2)  # 5 usable
    cached = seq_of(0, [1, 2, 3, 4])
    compute(bm, cached, 4)
    bm.free(cached)
    assert bm.ensure_capacity(seq_of(1, [0]), 6)  # 3 blocks: exactly the never-cached ones
    assert bm.num_cached_blocks == 2


def test_referenced_cached_blocks_are_never_evicted() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)  # 3 usable
    holder = seq_of(0, [1, 2, 3, 4])
    compute(bm, holder, 4)
    assert not bm.ensure_capacity(seq_of(1, [0]), 4)  # 2 needed, 1 free: nothing is taken
    assert bm.num_cached_blocks == 2


def test_allocate_is_all_or_nothing_counting_revived_blocks() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)  # 3 usable
    first = seq_of(0, [1, 2, 3, 4])
    compute(bm, first, 4)
    bm.free(first)
    seq = seq_of(1, [1, 2, 3, 4, 5, 6, 7])
    cached = bm.lookup(seq, 6)
    assert len(cached) == 2
    assert not bm.allocate(seq, cached, 8)  # 2 revived + 2 new > 3 free
    assert seq.block_table == [] and bm.num_free_blocks == 3 and bm.num_hit_tokens == 0
    assert bm.allocate(seq, cached, 6)
    bm.check_invariants([seq.block_table])


def test_reset_prefix_cache_refuses_while_blocks_are_held() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    seq = seq_of(0, [1, 2, 3, 4])
    compute(bm, seq, 4)
    assert not bm.reset_prefix_cache() and bm.num_cached_blocks == 2
    bm.free(seq)
    assert bm.reset_prefix_cache() and bm.num_cached_blocks == 0
    assert admit(bm, seq_of(1, [1, 2, 3, 4, 5])) == 0
    bm.check_invariants()


def test_caching_off_caches_nothing() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, enable_caching=False)
    compute(bm, seq_of(0, [1, 2, 3, 4]), 4)
    assert bm.num_cached_blocks == 0
    assert admit(bm, seq_of(1, [1, 2, 3, 4, 5])) == 0 and bm.num_queried_tokens == 0


# ---- the scheduler ----------------------------------------------------------------------------


def make_scheduler(num_blocks: int = 32, budget: int = 16, max_num_seqs: int = 4) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, 4), max_num_seqs, budget, 4, 64)


def run_to_end(sched: Scheduler, log: list | None = None) -> list:
    """Step with a fake device; `log` gets (seq_id, start, outputs so far) of prefill items."""
    plans = []
    while (plan := sched.schedule()) is not None:
        plans.append(plan)
        if log is not None and plan.is_prefill:
            log += [(i.seq.seq_id, i.start, i.seq.num_output_tokens) for i in plan.scheduled]
        sampled = {i.seq.seq_id: 500 + i.seq.num_output_tokens for i in plan.scheduled if i.samples}
        for seq in sched.update(plan, sampled):
            if seq.num_output_tokens == seq.max_tokens:
                sched.finish(seq, "length")
    return plans


def prefilled_tokens(plans) -> int:
    return sum(plan.num_tokens for plan in plans if plan.is_prefill)


def test_a_second_request_prefills_only_its_uncached_suffix() -> None:
    sched = make_scheduler()
    prefix = list(range(12))
    sched.add(seq_of(0, prefix + [50, 51], max_tokens=2))
    assert prefilled_tokens(run_to_end(sched)) == 14
    later = seq_of(1, prefix + [60, 61, 62], max_tokens=2)
    sched.add(later)
    plan = sched.schedule()
    assert plan.scheduled[0].start == 12 and plan.scheduled[0].num_new_tokens == 3
    run_to_end(sched)
    assert later.output_token_ids == [500, 501]
    sched.block_manager.check_invariants([])


def test_prompt_logprobs_requests_compute_every_position() -> None:
    sched = make_scheduler()
    sched.add(seq_of(0, list(range(12)), max_tokens=1))
    run_to_end(sched)
    scoring = seq_of(1, list(range(12)), max_tokens=1)
    scoring.reuse_cached_prefix = False
    sched.add(scoring)
    assert sched.schedule().scheduled[0].start == 0


def test_forks_after_a_full_hit_decode_straight_away() -> None:
    sched = make_scheduler()
    sched.add(seq_of(0, list(range(9)), max_tokens=1))
    run_to_end(sched)  # blocks 0-1 (tokens 0-7) cached
    parent = seq_of(1, list(range(9)), max_tokens=2)
    forks = [seq_of(2, list(range(9)), max_tokens=2), seq_of(3, list(range(9)), max_tokens=2)]
    sched.add(parent, forks)
    plan = sched.schedule()  # 8 cached tokens, the parent holds back its last: no prefill
    assert not plan.is_prefill and len(plan.scheduled) == 3
    assert all(item.start == 8 for item in plan.scheduled)
    run_to_end(sched)
    sched.block_manager.check_invariants([])


def test_a_preempted_sequence_recomputes_from_the_cache() -> None:
    sched = make_scheduler(num_blocks=8, budget=16, max_num_seqs=2)  # 7 usable blocks
    a, b = seq_of(0, list(range(10)), max_tokens=8), seq_of(1, list(range(20, 30)), max_tokens=8)
    sched.add(a)
    sched.add(b)
    log: list = []
    run_to_end(sched, log)
    assert sched.num_preemptions >= 1
    recomputes = [(seq_id, start) for seq_id, start, outputs in log if outputs > 0]
    assert recomputes and all(start > 0 for _, start in recomputes)  # cached blocks came back
    assert a.output_token_ids == [500 + i for i in range(8)]
    sched.block_manager.check_invariants([])


# ---- the state machine ------------------------------------------------------------------------


class PrefixCacheMachine(RuleBasedStateMachine):
    """Random admit (with reuse) / compute / free on a small token alphabet, so prefixes repeat.

    Checked at every step: the block manager's own invariants (free lists, cache map, ref counts
    against the live tables); nothing leaks; every block a live sequence holds keeps its cache
    entry (referenced blocks are never evicted); eviction takes the least recently freed cached
    block; and reused blocks hold exactly the tokens they are reused for.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(num_blocks=12, block_size=2)
        self.live: dict[int, Sequence] = {}
        self.next_id = 0
        self.contents: dict[int, tuple[int, ...]] = {}  # block -> tokens computed into it
        self.lru: list[int] = []  # model of the evictable queue, oldest first

    def _cached_blocks(self) -> set[int]:
        return set(self.bm._cached.values())

    def _evicted_since(self, before: set[int]) -> list[int]:
        gone = before - self._cached_blocks()
        for block in gone:
            self.contents.pop(block, None)
        return sorted(gone, key=self.lru.index) if gone else []

    def _check_eviction(self, before: set[int]) -> None:
        gone = self._evicted_since(before)
        assert gone == self.lru[: len(gone)], f"evicted {gone}, LRU order {self.lru}"
        del self.lru[: len(gone)]

    @rule(
        tokens=st.lists(st.integers(0, 2), min_size=1, max_size=9),
        compute_to=st.integers(0, 9),
    )
    def admit(self, tokens: list[int], compute_to: int) -> None:
        seq = Sequence(seq_id=self.next_id, prompt_token_ids=tokens, max_tokens=1)
        self.next_id += 1
        cached = self.bm.lookup(seq, seq.num_tokens - 1)
        for index, block in enumerate(cached):  # a hit holds exactly these tokens
            assert self.contents[block] == tuple(tokens[2 * index : 2 * index + 2])
        before = self._cached_blocks()
        if not self.bm.allocate(seq, cached, seq.num_tokens):
            assert seq.block_table == []
            return
        for block in cached:
            if block in self.lru:
                self.lru.remove(block)
        self._check_eviction(before)
        self.live[seq.seq_id] = seq
        seq.num_computed_tokens = len(cached) * 2
        self._compute(seq, max(seq.num_computed_tokens, min(compute_to, seq.num_tokens)))

    def _compute(self, seq: Sequence, upto: int) -> None:
        for position in range(seq.num_computed_tokens, upto):
            block = seq.block_table[position // 2]
            if position % 2 == 0:
                self.contents[block] = ()
            self.contents[block] += (seq.all_token_ids[position],)
        seq.num_computed_tokens = upto
        self.bm.cache_full_blocks(seq)

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 10_000))
    def finish_computing(self, index: int) -> None:
        seq = self.live[sorted(self.live)[index % len(self.live)]]
        self._compute(seq, seq.num_tokens)

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 10_000))
    def free(self, index: int) -> None:
        seq = self.live.pop(sorted(self.live)[index % len(self.live)])
        cached = self._cached_blocks()
        for block in reversed(seq.block_table):
            if self.bm.ref_count(block) == 1 and block in cached:
                self.lru.append(block)
        self.bm.free(seq)

    @invariant()
    def consistent(self) -> None:
        self.bm.check_invariants([seq.block_table for seq in self.live.values()])
        used = {block for seq in self.live.values() for block in seq.block_table}
        assert self.bm.num_free_blocks == self.bm.num_usable_blocks - len(used)
        cached = self._cached_blocks()
        assert set(self.lru) == cached - used, "evictable blocks disagree with the LRU model"
        for seq in self.live.values():
            for block in seq.block_table[: seq.num_computed_tokens // 2]:
                if block in self.bm._cached.values():
                    assert self.bm.ref_count(block) > 0

    def teardown(self) -> None:
        for seq in self.live.values():
            self.bm.free(seq)
        assert self.bm.num_free_blocks == self.bm.num_usable_blocks
        self.bm.check_invariants([])


PrefixCacheMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestPrefixCacheMachine = PrefixCacheMachine.TestCase
