"""Data-parallel measurements on 8 fake CPU devices, run in a subprocess by test_data_parallel.

Like tp_worker: `python -m tests.parallel.dp_worker OUT.json` with XLA_FLAGS set by the test; it
only measures and writes JSON, and the test asserts. One engine on one device is the reference;
DP=2 and DP=2 x TP=2 run the same two generate() calls (greedy, then sampling with seeded and
unseeded requests), so request ids and unseeded requests' seeds continue across calls.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from jaxinfer import Engine, EngineConfig, SamplingParams
from jaxinfer.engine.data_parallel import balance
from tests.checkpoints import tiny_checkpoint
from tests.parallel.tp_worker import ENGINE

PROMPT_LENGTHS = (3, 17, 40, 90, 9, 25)  # and two text prompts
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2)
SAMPLED = [  # unseeded requests get request_seed(engine seed, request index)
    SamplingParams(
        temperature=0.9, top_p=0.9, max_tokens=10, ignore_eos=True, logprobs=2, seed=seed
    )
    for seed in (None, 7, None, 11, None, None, 3, None)
]
CASES = {"dp2": (2, 1), "dp2-tp2": (2, 2)}  # name -> (data_parallel_size, tensor_parallel_size)


def summary(outputs) -> list[dict]:
    return [
        {
            "request_id": out.request_id,
            "token_ids": out.outputs[0].token_ids,
            "text": out.outputs[0].text,
            "cumulative_logprob": out.outputs[0].cumulative_logprob,
            "logprobs": [
                {str(t): lp.logprob for t, lp in step.items()} for step in out.outputs[0].logprobs
            ],
        }
        for out in outputs
    ]


def run(engine: Engine, prompts: list) -> dict:
    return {
        "greedy": summary(engine.generate(prompts, GREEDY, use_tqdm=False)),
        "sampled": summary(engine.generate(prompts, SAMPLED, use_tqdm=False)),
    }


def device_ids(array: jax.Array) -> list[int]:
    return sorted(d.id for d in array.devices())


def placement(replica: Engine) -> dict:
    """The devices each weight, the KV cache and the sampling state (an output of every step)
    live on."""
    params = jax.tree.leaves(replica.model.params)
    cache = jax.tree.leaves(replica.runner.kv_cache)
    return {
        "weights": sorted({d for a in params for d in device_ids(a)}),
        "kv_cache": sorted({d for a in cache for d in device_ids(a)}),
        "slot_state": sorted(
            {d for a in jax.tree.leaves(replica.runner.slot_state) for d in device_ids(a)}
        ),
    }


def main(out_path: str) -> None:
    rng = np.random.default_rng(0)
    texts = ["Hello there", "The quick brown fox jumps over the lazy dog"]
    prompts = [rng.integers(5, 512, size=n).tolist() for n in PROMPT_LENGTHS] + texts
    path = str(tiny_checkpoint("llama", num_kv_heads=2, num_attention_heads=8, head_dim=8))
    results: dict = {"devices": len(jax.devices()), "cases": {}, "errors": {}}
    single = Engine(EngineConfig(model=path, **ENGINE))
    results["single"] = run(single, prompts)
    for name, (dp, tp) in CASES.items():
        config = EngineConfig(model=path, data_parallel_size=dp, tensor_parallel_size=tp, **ENGINE)
        with Engine(config) as engine:
            results["cases"][name] = {
                "type": type(engine.llm_engine).__name__,
                "outputs": run(engine, prompts),
                "replicas": [placement(replica) for replica in engine.llm_engine.replicas],
                # the second call repeats the first one's prompts on the same replicas
                "prefix_cache_hits": [
                    r.stats.prefix_cache_hits for r in engine.llm_engine.replicas
                ],
            }
    # Batching alone moves logprobs by ~1e-6 (a request's prefill chunks and batch-mates differ),
    # so the bitwise check gives the first replica's share of the greedy call to a fresh engine.
    lengths = [len(single.tokenizer.encode(p)) if isinstance(p, str) else len(p) for p in prompts]
    share = balance([n + GREEDY.max_tokens for n in lengths], 2)[0]
    single.shutdown()
    with Engine(EngineConfig(model=path, **ENGINE)) as fresh:
        results["share"] = share
        results["single_share"] = summary(
            fresh.generate([prompts[i] for i in share], GREEDY, use_tqdm=False)
        )
    for dp, tp in ((3, 4), (9, 1)):
        try:
            Engine(EngineConfig(model=path, data_parallel_size=dp, tensor_parallel_size=tp))
        except ValueError as error:
            results["errors"][f"dp{dp}-tp{tp}"] = str(error)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
