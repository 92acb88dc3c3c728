"""The device mesh and the one table that maps logical weight axes onto it.

Parallelism is declared, not hand-written: every weight names its logical axes once (in its
family's `declare_weights`), `LOGICAL_RULES` maps them to mesh axes, and XLA's partitioner inserts
the collectives. Megatron layout under tensor parallelism: q/k/v and gate/up are column-parallel
(their output axis, heads or MLP width, is split), o and down are row-parallel (their input axis
is split, so each layer ends in one all-reduce after attention and one after the MLP), the
embedding and lm_head are split over the vocabulary.

Axes are `('data', 'stage', 'model')`, all `AxisType.Auto`: `jax.make_mesh` defaults to Explicit
axes in jax 0.10+, under which a plain matmul with a sharded contracting dimension raises instead
of letting XLA insert the all-reduce.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "stage", "model")

# logical axis -> mesh axis (None: replicated). Names are those the families declare.
LOGICAL_RULES: dict[str, str | None] = {
    "vocab": "model",
    "q_heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "embed": None,
    # A fused q/k/v projection (GPT-2, Phi-3) stays whole: split by columns, each device would
    # get a mix of q, k and v heads that XLA has to reshuffle in every layer.
    "qkv_heads": None,
}


def build_mesh(
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    data_parallel_size: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A `(data, stage, model)` mesh over the first D x P x T of `devices` (default:
    `jax.devices()`), as vLLM takes the first GPUs it needs."""
    devices = list(jax.devices() if devices is None else devices)
    wanted = data_parallel_size * pipeline_parallel_size * tensor_parallel_size
    if wanted > len(devices):
        raise ValueError(
            f"data_parallel_size ({data_parallel_size}) x pipeline_parallel_size "
            f"({pipeline_parallel_size}) x tensor_parallel_size ({tensor_parallel_size}) = "
            f"{wanted} devices, but only {len(devices)} are available ({devices[0].platform}); "
            "on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N devices"
        )
    grid = np.asarray(devices[:wanted], dtype=object).reshape(
        data_parallel_size, pipeline_parallel_size, tensor_parallel_size
    )
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def partition_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> PartitionSpec:
    """Logical axes of one array -> its PartitionSpec under LOGICAL_RULES.

    Given the array's shape and the mesh, an axis the mesh axis does not divide stays replicated
    (a 49155-token vocabulary under TP 2, say): correct, only less memory-efficient for that one
    array. Head and MLP axes always divide (`check_tensor_parallel`).
    """
    unknown = [axis for axis in logical_axes if axis is not None and axis not in LOGICAL_RULES]
    if unknown:
        raise ValueError(f"no sharding rule for logical axes {unknown}; known: {LOGICAL_RULES}")
    spec = []
    for i, axis in enumerate(logical_axes):
        mesh_axis = None if axis is None else LOGICAL_RULES[axis]
        divisible = shape is None or mesh is None or shape[i] % mesh.shape.get(mesh_axis, 1) == 0
        spec.append(mesh_axis if divisible else None)
    return PartitionSpec(*spec)


def named_sharding(
    mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None
) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(logical_axes, shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# The KV cache [K, N, P, D] is split over kv heads, like the k/v projections that fill it.
KV_CACHE_AXES = ("kv_heads", None, None, None)


def check_tensor_parallel(model_config, tensor_parallel_size: int) -> None:
    """Heads must divide evenly; kv heads must divide, or be fewer and divide the TP size (they are
    then replicated in groups, see `kv_head_replication`)."""
    t = tensor_parallel_size
    kv_heads = getattr(model_config, "num_kv_heads", None)
    if kv_heads is None:  # encoders (BERT) declare no kv heads and have no sharded path yet
        raise ValueError(
            f"{type(model_config).__name__} (an encoder) runs on one device: "
            "tensor_parallel_size, pipeline_parallel_size and data_parallel_size are supported "
            "for decoder models only"
        )
    heads = model_config.num_heads
    if heads % t:
        raise ValueError(
            f"tensor_parallel_size {t} must divide the number of attention heads ({heads})"
        )
    if kv_heads % t and t % kv_heads:
        raise ValueError(
            f"tensor_parallel_size {t} and the number of kv heads ({kv_heads}) must divide one "
            "another"
        )


def kv_head_replication(model_config, tensor_parallel_size: int) -> int:
    """How many copies of each kv head the model needs so that every device holds the kv heads
    its query heads read: 1 when kv heads >= TP size, TP / kv heads otherwise."""
    return max(1, tensor_parallel_size // model_config.num_kv_heads)
