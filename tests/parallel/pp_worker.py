"""Pipeline-parallel measurements on 8 fake CPU devices, run in a subprocess by
test_pipeline_parallel.

Like tp_worker: `python -m tests.parallel.pp_worker OUT.json` with XLA_FLAGS set by the test; it
only measures and writes JSON, and the test asserts. The single-device engine is the reference for
Llamas (8 query heads, 2 kv heads): 3 layers over 2 stages and 5 over 4 (vLLM's default split puts
the extra layer before the last stage: 2,1 and 1,1,2,1) and 5 layers under TP 2 x PP 2 split 2,3
by `pipeline_layer_partition`; and for 2-layer Gemma 2 (tied embeddings, a sliding layer then a
global one) under PP 2.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import jax
import numpy as np

from jaxinfer import Engine, EngineConfig, SamplingParams
from tests.checkpoints import tiny_checkpoint
from tests.parallel.tp_worker import ENGINE, PROMPT_LENGTHS, prompts_for, shard_report
from tests.parity import engine_prefill_logits

PIPELINE_ENGINE = ENGINE | {"seq_buckets": (1, 2, 4), "token_buckets": (32, 128)}
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SEEDED = [
    SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, ignore_eos=True, seed=seed)
    for seed in (1, 2, 3, 4)
]
LLAMA_CASES = {  # name -> (layers, tensor_parallel_size, pipeline_parallel_size, partition)
    "llama3-pp2": (3, 1, 2, None),  # vLLM's default split: 2, 1
    "llama5-pp4": (5, 1, 4, None),  # vLLM's default split: 1, 1, 2, 1
    "llama5-tp2-pp2": (5, 2, 2, "2,3"),  # explicit, unlike the default 3, 2
}
FAMILY_CHECKPOINTS = {  # what `embed` and `logits` read differs from Llama's
    "gemma2": {"tie_word_embeddings": True},  # the embedding on both ends; per-layer windows
}
THOROUGH_CASE = "llama3-pp2"  # also: no compilation after warm-up; stages taking turns
# The thorough case's buckets exercise micro-batches of 1, 2 and 4 sequences; the others compile
# one bucket of each kind per stage (ENGINE's), which keeps the suite quick.
THOROUGH_LAYERS = LLAMA_CASES[THOROUGH_CASE][0]


def tokens(outputs) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in outputs]


def reference(path: str, prompts: list, options: dict = PIPELINE_ENGINE) -> dict:
    with Engine(EngineConfig(model=path, **options)) as single:
        return {
            "logits": engine_prefill_logits(single, prompts, chunk_size=32),
            "greedy": tokens(single.generate(prompts, GREEDY, use_tqdm=False)),
            "seeded": tokens(single.generate(prompts, SEEDED, use_tqdm=False)),
        }


def device_ids(array: jax.Array) -> list[int]:
    return sorted(d.id for d in array.devices())


def placement(engine: Engine) -> dict:
    """Where every stage's weights and KV cache live, and how many weight bytes each device
    holds."""
    stages = []
    bytes_per_device: dict[int, int] = defaultdict(int)
    for stage in engine.llm_engine.runner.stages:
        leaves = jax.tree.leaves(stage.params)
        first_layer = stage.params["layers"][0]
        for leaf in leaves:
            for shard in leaf.addressable_shards:
                bytes_per_device[shard.device.id] += shard.data.nbytes
        stages.append(
            {
                "layers": [stage.layers.start, stage.layers.stop],
                "param_bytes": sum(leaf.nbytes for leaf in leaves),  # whole, not per shard
                "params": sorted(k for k in stage.params if k != "layers"),
                "weight_devices": sorted({d for leaf in leaves for d in device_ids(leaf)}),
                "kv_cache_devices": sorted(
                    {d for leaf in jax.tree.leaves(stage.kv_cache) for d in device_ids(leaf)}
                ),
                "kv_cache_layers": len(stage.kv_cache),
                "q": shard_report(first_layer.get("q", first_layer.get("qkv"))),
                "kv_cache": shard_report(stage.kv_cache[0][0]),
            }
        )
    whole = sum(leaf.nbytes for leaf in jax.tree.leaves(engine.llm_engine.model.params))
    return {"stages": stages, "bytes_per_device": bytes_per_device, "model_bytes": whole}


def steps_in_flight(engine: Engine, prompts: list) -> tuple[list[list[int]], int]:
    """Greedy tokens, and the most steps dispatched but not yet read back at any moment."""
    runner, counts = engine.llm_engine.runner, {"now": 0, "most": 0}
    dispatch, collect = runner.dispatch, runner.collect

    def counting_dispatch(bucket, inputs, previous=None):
        counts["now"] += 1
        counts["most"] = max(counts["most"], counts["now"])
        return dispatch(bucket, inputs, previous)

    def counting_collect(outputs):
        counts["now"] -= 1
        return collect(outputs)

    runner.dispatch, runner.collect = counting_dispatch, counting_collect
    try:
        return tokens(engine.generate(prompts, GREEDY, use_tqdm=False)), counts["most"]
    finally:
        del runner.dispatch, runner.collect


def measure(
    path: str,
    prompts: list,
    base: dict,
    tp: int,
    pp: int,
    *,
    thorough: bool,
    partition: str | None = None,
    options: dict = PIPELINE_ENGINE,
) -> dict:
    config = EngineConfig(
        model=path,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        pipeline_layer_partition=partition,
        **options,
    )
    with Engine(config) as engine:
        logits = engine_prefill_logits(engine, prompts, chunk_size=32)
        if thorough:
            engine.warmup()
        compiled = engine.num_compilations
        greedy = tokens(engine.generate(prompts, GREEDY, use_tqdm=False))
        seeded = tokens(engine.generate(prompts, SEEDED, use_tqdm=False))
        report = {
            "max_logit_diff": float(
                max(np.abs(a - b).max() for a, b in zip(logits, base["logits"], strict=True))
            ),
            "greedy_equal": greedy == base["greedy"],
            "seeded_equal": seeded == base["seeded"],
            "greedy": greedy,
            "new_compilations": engine.num_compilations - compiled if thorough else None,
            **placement(engine),
        }
        if thorough:
            greedy, report["steps_in_flight"] = steps_in_flight(engine, prompts)
            report["in_flight_greedy_equal"] = greedy == base["greedy"]
    if not thorough:
        return report
    # One batch (stages take turns) must give the same tokens as micro-batches in flight.
    with Engine(config.replace(pipeline_micro_batches=1)) as turns:
        greedy, report["one_batch_steps_in_flight"] = steps_in_flight(turns, prompts)
        report["one_batch_equal"] = greedy == base["greedy"]
    return report


def errors(path: str) -> dict:
    found = {}
    for name, changes in {
        "pp8-of-5-layers": {"pipeline_parallel_size": 8},
        "partition-sum": {"pipeline_parallel_size": 2, "pipeline_layer_partition": "2,2"},
        "pp16": {"pipeline_parallel_size": 16},
        "micro0": {"pipeline_parallel_size": 2, "pipeline_micro_batches": 0},
    }.items():
        try:
            Engine(EngineConfig(model=path, **PIPELINE_ENGINE, **changes))
        except ValueError as error:
            found[name] = str(error)
    return found


def llama_checkpoint(num_layers: int) -> str:
    return str(
        tiny_checkpoint(
            "llama", num_kv_heads=2, num_attention_heads=8, head_dim=8, num_hidden_layers=num_layers
        )
    )


def main(out_path: str) -> None:
    prompts = prompts_for(PROMPT_LENGTHS)
    results: dict = {"devices": len(jax.devices()), "cases": {}}
    bases: dict[int, tuple[str, dict]] = {}  # layers -> (checkpoint, one-device reference)
    for name, (layers, tp, pp, partition) in LLAMA_CASES.items():
        options = PIPELINE_ENGINE if layers == THOROUGH_LAYERS else ENGINE
        if layers not in bases:
            path = llama_checkpoint(layers)
            bases[layers] = (path, reference(path, prompts, options))
        path, base = bases[layers]
        results["cases"][name] = measure(
            path,
            prompts,
            base,
            tp,
            pp,
            thorough=name == THOROUGH_CASE,
            partition=partition,
            options=options,
        )
    for family, family_options in FAMILY_CHECKPOINTS.items():
        path = str(tiny_checkpoint(family, **family_options))
        results["cases"][f"{family}-pp2"] = measure(
            path, prompts, reference(path, prompts, ENGINE), 1, 2, thorough=False, options=ENGINE
        )
    results["errors"] = errors(bases[5][0])
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
