"""One of two processes serving one tensor-parallel engine (test_multiprocess.py starts both).

    python -m tests.parallel.mp_worker MODEL PROCESS_ID COORDINATOR OUT.json

Each process has 2 fake CPU devices; TP 4 spans both processes, so every layer's all-reduces cross
the process boundary (gloo). Only process 0 passes prompts: the engine sends them to process 1.
"""

from __future__ import annotations

import json
import sys

from jaxinfer import Engine, EngineConfig, SamplingParams
from tests.parallel.tp_worker import ENGINE, PROMPT_LENGTHS, prompts_for

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=10, ignore_eos=True)


def main(model: str, process_id: int, coordinator: str, out_path: str) -> None:
    config = EngineConfig(
        model=model,
        tensor_parallel_size=4,
        distributed_coordinator=coordinator,
        num_processes=2,
        process_id=process_id,
        **ENGINE,
    )
    with Engine(config) as engine:
        import jax

        mine = prompts_for(PROMPT_LENGTHS) if process_id == 0 else []
        greedy = engine.generate(mine, GREEDY, use_tqdm=False)
        sampled = engine.generate(mine, SAMPLED, use_tqdm=False)
        result = {
            "process_index": jax.process_index(),
            "process_count": jax.process_count(),
            "devices": len(jax.devices()),
            "local_devices": len(jax.local_devices()),
            "greedy": [o.outputs[0].token_ids for o in greedy],
            "sampled": [o.outputs[0].token_ids for o in sampled],
        }
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
