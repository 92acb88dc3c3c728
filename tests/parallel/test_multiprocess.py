"""One engine over two processes through jax.distributed (gloo on CPU): 2 processes x 2 fake
CPU devices serve a TP=4 model. Requests enter at process 0 only; both processes must produce
the single-device engine's tokens (greedy and seeded sampling)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from jaxinfer import Engine, EngineConfig
from tests.checkpoints import tiny_checkpoint
from tests.parallel.fake_devices import ROOT, xla_flags_with_devices
from tests.parallel.mp_worker import GREEDY, SAMPLED
from tests.parallel.tp_worker import ENGINE, PROMPT_LENGTHS, prompts_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model() -> str:
    return str(tiny_checkpoint("llama", num_kv_heads=8, num_attention_heads=8, head_dim=8))


def test_two_processes_serve_one_tensor_parallel_engine(model, tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["XLA_FLAGS"] = xla_flags_with_devices(2)
    outs = [tmp_path / f"process{i}.json" for i in range(2)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.parallel.mp_worker", model, str(i), coordinator, str(o)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, o in enumerate(outs)
    ]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    for worker, log in zip(workers, logs, strict=True):
        assert worker.returncode == 0, log[-3000:]
    results = [json.loads(o.read_text()) for o in outs]

    prompts = prompts_for(PROMPT_LENGTHS)
    with Engine(EngineConfig(model=model, **ENGINE)) as single:
        greedy = [o.outputs[0].token_ids for o in single.generate(prompts, GREEDY)]
        sampled = [o.outputs[0].token_ids for o in single.generate(prompts, SAMPLED)]
    for index, result in enumerate(results):
        assert result["process_index"] == index and result["process_count"] == 2
        assert result["devices"] == 4 and result["local_devices"] == 2
        assert result["greedy"] == greedy  # process 1 passed no prompts: it got process 0's
        assert result["sampled"] == sampled


def test_coordinator_without_process_settings_is_a_clear_error(model, monkeypatch):
    for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    config = EngineConfig(model=model, distributed_coordinator="127.0.0.1:1", **ENGINE)
    with pytest.raises(ValueError, match="num_processes and process_id"):
        Engine(config)
