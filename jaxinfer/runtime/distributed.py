"""One engine over several processes, through JAX's own multi-controller runtime.

Every process runs the same program (JAX's multi-controller model): each loads the model, and
each places only its own devices' shards; the compiled steps span all processes' devices, and XLA
runs the collectives between them (gloo on CPU, NCCL on GPU). Nothing here is home-made: this
module only calls `jax.distributed.initialize` with the engine's settings and moves a request
list from process 0 to the others with `multihost_utils.broadcast_one_to_all`.
"""

from __future__ import annotations

import os
import pickle

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxinfer.config import EngineConfig

# The standard variables, as `jax.distributed.initialize` documents its arguments.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _setting(value, env_name: str, cast):
    if value is not None:
        return value
    raw = os.environ.get(env_name)
    return None if raw in (None, "") else cast(raw)


def initialize(config: EngineConfig) -> bool:
    """Join the multi-process runtime if the config or environment asks for it; -> joined.

    Must run before anything touches a JAX device. A process already initialized (by the user's
    own `jax.distributed.initialize`) is left as it is.
    """
    coordinator = _setting(config.distributed_coordinator, ENV_COORDINATOR, str)
    if coordinator is None:
        return False
    num_processes = _setting(config.num_processes, ENV_NUM_PROCESSES, int)
    process_id = _setting(config.process_id, ENV_PROCESS_ID, int)
    if num_processes is None or process_id is None:
        raise ValueError(
            f"EngineConfig.distributed_coordinator {coordinator!r} needs num_processes and "
            f"process_id (or {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID})"
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"EngineConfig.process_id must be in [0, {num_processes}), got {process_id}"
        )
    from jax._src import distributed as jax_distributed  # is this process already in?

    if jax_distributed.global_state.client is None:
        if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get(
            "JAX_PLATFORMS", "cpu"
        ).startswith("cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    return True


def from_process_zero(value):
    """Process 0's `value` on every process (pickled, sent as bytes): the requests of a step loop
    that every process must run identically."""
    if jax.process_count() == 1:
        return value
    payload = pickle.dumps(value) if jax.process_index() == 0 else b""
    size = int(multihost_utils.broadcast_one_to_all(np.int64(len(payload))))
    buffer = np.zeros(size, np.uint8)
    if jax.process_index() == 0:
        buffer[:] = np.frombuffer(payload, np.uint8)
    received = multihost_utils.broadcast_one_to_all(buffer)
    return pickle.loads(np.asarray(received).tobytes())
