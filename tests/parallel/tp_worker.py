"""Tensor-parallel measurements on 8 fake CPU devices, run in a subprocess by test_tensor_parallel.

The device count must be set before JAX starts, and the rest of the suite runs on one device, so
this module runs as `python -m tests.parallel.tp_worker OUT.json` with XLA_FLAGS set by the test;
it only measures and writes JSON, and the test asserts.
"""

from __future__ import annotations

import json
import re
import sys

import jax
import numpy as np

from jaxinfer import Engine, EngineConfig, SamplingParams
from tests.checkpoints import tiny_checkpoint
from tests.parity import engine_prefill_logits

ENGINE = {
    "dtype": "float32",
    "max_model_len": 128,
    "num_kv_blocks": 40,
    "max_num_seqs": 4,
    "max_num_batched_tokens": 128,
    "max_prefill_seqs": 4,
    "seq_buckets": (4,),
    "token_buckets": (128,),
}
PROMPT_LENGTHS = (3, 17, 40, 90)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
CASES = {  # checkpoint name -> (kv heads, TP sizes)
    "kv8": (8, (2, 4, 8)),
    "kv2": (2, (2, 4, 8)),
}


def shard_report(array: jax.Array) -> dict:
    shards = array.addressable_shards
    return {
        "global_shape": list(array.shape),
        "global_bytes": int(array.nbytes),
        "shard_shapes": [list(s.data.shape) for s in shards],
        "shard_bytes": [int(s.data.nbytes) for s in shards],
        "devices": len({s.device for s in shards}),
    }


def collectives(engine: Engine) -> dict:
    """Collective ops in the compiled prefill step's HLO, and the shapes all-gathers produce."""
    bucket = next(b for b in engine.llm_engine.buckets.all_buckets() if b.is_prefill)
    engine.llm_engine.runner.compile(bucket)
    text = engine.llm_engine.runner.stages[-1].executables[bucket].as_text()
    gathers = re.findall(r"= (\w+\[[\d,]*\])[^=]*? all-gather(?:-start)?\(", text)
    return {
        "all_reduce": len(re.findall(r" all-reduce(?:-start)?\(", text)),
        "all_gather_shapes": gathers,
        "layers": engine.llm_engine.model.model_config.num_layers,
    }


def prompts_for(lengths: tuple[int, ...]) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(5, 512, size=n).tolist() for n in lengths]


def main(out_path: str) -> None:
    prompts = prompts_for(PROMPT_LENGTHS)
    results: dict = {"devices": len(jax.devices()), "cases": {}}
    for name, (kv_heads, sizes) in CASES.items():
        path = tiny_checkpoint("llama", num_kv_heads=kv_heads, num_attention_heads=8, head_dim=8)
        with Engine(EngineConfig(model=str(path), **ENGINE)) as single:
            base_logits = engine_prefill_logits(single, prompts, chunk_size=32)
            base_tokens = [o.outputs[0].token_ids for o in single.generate(prompts, GREEDY)]
        for size in sizes:
            with Engine(EngineConfig(model=str(path), tensor_parallel_size=size, **ENGINE)) as e:
                logits = engine_prefill_logits(e, prompts, chunk_size=32)
                tokens = [o.outputs[0].token_ids for o in e.generate(prompts, GREEDY)]
                layer = e.llm_engine.model.params["layers"][0]
                report = {
                    "max_logit_diff": float(
                        max(np.abs(a - b).max() for a, b in zip(logits, base_logits, strict=True))
                    ),
                    "tokens_equal": tokens == base_tokens,
                    "tokens": tokens,
                    "kv_heads_stored": e.llm_engine.model.model_config.num_kv_heads,
                    "weights": {n: shard_report(layer[n]) for n in ("q", "k", "o", "gate", "down")},
                    "embed": shard_report(e.llm_engine.model.params["embed"]),
                    "lm_head": shard_report(e.llm_engine.model.params["lm_head"]),
                    "kv_cache": shard_report(e.llm_engine.runner.kv_cache[0][0]),
                }
                if size == 2:
                    report["collectives"] = collectives(e)
            if size == 2:  # multi-step decode over the mesh: the same tokens
                config = EngineConfig(
                    model=str(path), tensor_parallel_size=2, num_scheduler_steps=4, **ENGINE
                )
                with Engine(config) as e:
                    tokens = [o.outputs[0].token_ids for o in e.generate(prompts, GREEDY)]
                    report["multi_step_tokens_equal"] = tokens == base_tokens
                    report["multi_step_calls"] = e.llm_engine.stats.num_multi_step_calls
            results["cases"][f"{name}-tp{size}"] = report
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
