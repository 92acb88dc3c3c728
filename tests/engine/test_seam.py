"""The seam: each step input and output declared once; the host's padded arrays match it."""

import numpy as np
import pytest

from jaxinfer.engine.batching import BucketTable, RowSampling, build_step_inputs
from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.scheduler import Scheduler
from jaxinfer.engine.sequence import Sequence
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.seam import MAX_BANNED_PER_STEP, Bucket, SamplingScalars, StepInputs, StepOutputs


def test_specs_follow_the_bucket_letters():
    bucket = Bucket(is_prefill=True, num_tokens=32, num_seqs=4, num_blocks=8)
    spec = StepInputs.spec(bucket)
    assert spec.token_ids == ((32,), np.dtype(np.int32))
    assert spec.block_tables == ((4, 8), np.dtype(np.int32))
    assert spec.query_start_loc == ((5,), np.dtype(np.int32))
    assert spec.banned == ((4, MAX_BANNED_PER_STEP), np.dtype(np.int32))
    assert spec.sampled == ((4,), np.dtype(np.bool_))
    assert isinstance(spec.sampling, SamplingScalars)
    assert spec.sampling.seeds == ((4,), np.dtype(np.uint32))
    outputs = StepOutputs.spec(bucket, num_logprobs=5)
    assert outputs.top_ids == ((4, 5), np.dtype(np.int32))
    assert outputs.prompt_top_logprobs == ((32, 5), np.dtype(np.float32))


def test_built_inputs_match_their_declaration_and_padding_is_neutral():
    manager = BlockManager(num_blocks=32, block_size=4)
    scheduler = Scheduler(
        manager, max_num_seqs=4, max_num_batched_tokens=16, max_prefill_seqs=4, max_model_len=64
    )
    params = SamplingParams(temperature=0.7, top_p=0.5, seed=3)
    seqs = [Sequence(seq_id=i, prompt_token_ids=[1, 2, 3, i + 4], max_tokens=4) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    plan = scheduler.schedule()
    table = BucketTable(
        seq_buckets=(4,), token_buckets=(16,), block_buckets=(16,), max_prefill_seqs=4
    )
    bucket = table.select(plan, block_size=4)
    sampling = {s.seq_id: RowSampling(params, seed=9, slot=s.seq_id) for s in seqs}
    inputs = build_step_inputs(plan, bucket, 4, sampling, padding_slot=7, vocab_size=100)
    inputs.check(bucket, vocab_size=100)  # every array has its declared shape and dtype
    assert inputs.token_bitmask.shape == (4, 4) and (inputs.token_bitmask == -1).all()
    assert inputs.sampling.top_p.tolist() == [0.5, 0.5, 0.5, 1.0]  # the padding row: neutral
    assert inputs.slots.tolist() == [0, 1, 2, 7]
    assert inputs.query_start_loc.tolist() == [0, 4, 8, 12, 12]
    with pytest.raises(ValueError, match="token_ids"):
        inputs.replace(token_ids=np.zeros(3, np.int32)).check(bucket, vocab_size=100)


def test_progress_bar_says_what_compiles():
    """While a shape compiles the bar would sit at 0 tok/s; the runner's listener explains it."""
    from types import SimpleNamespace

    from jaxinfer.engine.core import EngineStats
    from jaxinfer.engine.offline import _Progress

    core = SimpleNamespace(runner=SimpleNamespace(compile_listener=None), stats=EngineStats())
    with _Progress(core, total=1, enabled=True) as progress:
        core.runner.compile_listener("the decode step for 4 sequences")
        assert progress.bar.postfix == "compiling the decode step for 4 sequences"
    assert core.runner.compile_listener is None
