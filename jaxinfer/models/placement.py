"""Where each converted weight goes: one device, or straight into its shard of a mesh (of its
pipeline stage's mesh, under pipeline parallelism: runtime/pipeline.py).

`jax.device_put(host_array, NamedSharding)` sends every device only its own slice, so a model that
does not fit one device never has to be whole on one device first.

Tensor parallelism needs each device's query heads to find their kv heads on the same device. With
fewer kv heads than devices (Llama-2-70B: 8 kv heads; TP 16), each kv head is stored `kv_repeat`
times, in order, so kv head j of the repeated model is original head j // kv_repeat: query head h
then reads repeated head h // (H / (K * kv_repeat)), whose original is h // (H / K), as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

from jaxinfer.models.family import WeightSpec
from jaxinfer.runtime.pipeline import StageLayout, weight_sharding


@dataclass(frozen=True)
class WeightPlacement:
    stages: StageLayout | None = None  # None: everything on the default device
    kv_repeat: int = 1  # copies of each kv head (tensor parallel with kv heads < TP size)
    kv_heads: int = 0  # the checkpoint's kv heads (needed only when kv_repeat > 1)

    def layout(self, spec: WeightSpec, array: np.ndarray) -> np.ndarray:
        """Repeat each kv head `kv_repeat` times along every axis declared "kv_heads"."""
        if self.kv_repeat == 1:
            return array
        for axis, name in enumerate(spec.logical_axes):
            if name == "kv_heads":
                size = array.shape[axis]
                heads = array.reshape(
                    *array.shape[:axis],
                    self.kv_heads,
                    size // self.kv_heads,
                    *array.shape[axis + 1 :],
                )
                repeated = np.repeat(heads, self.kv_repeat, axis=axis)
                array = repeated.reshape(*array.shape[:axis], -1, *array.shape[axis + 1 :])
        return array

    def sharding(self, path: str, spec: WeightSpec) -> jax.sharding.Sharding:
        """Where parameter `path` lives (also the weight cache's restore target)."""
        if self.stages is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return weight_sharding(self.stages, path, spec, spec.shape)

    def put(self, path: str, spec: WeightSpec, array: np.ndarray) -> jax.Array:
        array = np.ascontiguousarray(array)
        if self.stages is None:
            return jax.device_put(array)
        return jax.device_put(array, self.sharding(path, spec))


ONE_DEVICE = WeightPlacement()
