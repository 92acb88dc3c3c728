"""Pipeline stages: which layers, weights and devices each stage owns.

The mesh's `stage` axis cuts the model into P contiguous layer ranges. Stage s is its own
`(data=1, stage=1, model=T)` sub-mesh: its layers' weights and KV cache live only there, and
tensor parallelism inside a stage works exactly as without pipelining. The first stage also holds
what the family's `embed` reads (`EMBED_PARAMS`), the last stage everything `logits` reads (final
norm, lm_head; a copy of the embedding when the two are tied). Hidden states [T, E] move from one
stage's devices to the next between stage executables (`runtime/runner.py`).

Stages are separate executables rather than one SPMD program over the stage axis: each stage then
runs only its own layers' work (an SPMD pipeline computes every stage in every tick, bubbles
included), per-layer differences (Gemma 2's alternating windows) need no stacking, and XLA's async
dispatch lets stage s work on micro-batch m + 1 while stage s + 1 works on micro-batch m.

The engine keeps one step in flight per micro-batch of sequences (`EngineConfig.
pipeline_micro_batches`, one scheduler each: `engine.scheduler.SchedulerGroup`), so in steady
state every stage has a micro-batch to work on, for prefill and decode alike.

Stages need not hold equally many layers (`layer_partition`): 30 layers over 4 stages run as
7, 8, 8, 7. Layers are a tuple of per-layer parameter trees, not one array stacked over a stage
axis, so a stage of 8 layers is simply a program that runs 8 layers: nothing is padded to the
largest stage, no layer is masked or skipped at run time, and results are exactly those of one
device. Every stage already compiles its own executables (its first layer, its weights and its
cache are its own), so uneven stages add no compiled programs either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinfer.config import parse_layer_partition
from jaxinfer.runtime.mesh import named_sharding


def layer_partition(
    num_layers: int, pipeline_parallel_size: int, override: Sequence[int] | None = None
) -> tuple[int, ...]:
    """How many layers each of the P stages holds, first stage first.

    Without `override`, vLLM's default (`get_pp_indices` in vllm/distributed/utils.py): every
    stage gets num_layers // P, and the remainder goes one layer each to the stages counted back
    from the second-to-last (partitions[-2], partitions[-3], ...). The last stage also runs the
    final norm, lm_head and sampler, so it gets no extra layer; with a remainder of at most P - 2
    the first stage (the embedding) gets none either. 30 layers over 4 stages: 7, 8, 8, 7; 3 over
    2: 2, 1; 5 over 4: 1, 1, 2, 1.

    `override` (`EngineConfig.pipeline_layer_partition`, vLLM's VLLM_PP_LAYER_PARTITION) must name
    P stages of >= 1 layer summing to num_layers. Raises ValueError naming what is wrong.
    """
    p = pipeline_parallel_size
    if p < 1:
        raise ValueError(f"pipeline_parallel_size must be >= 1, got {p}")
    if override is not None:
        counts = parse_layer_partition(override)
        shown = ",".join(map(str, counts))
        if len(counts) != p:
            raise ValueError(
                f"pipeline_layer_partition {shown} names {len(counts)} stages, but "
                f"pipeline_parallel_size is {p}"
            )
        if sum(counts) != num_layers:
            raise ValueError(
                f"pipeline_layer_partition {shown} adds up to {sum(counts)} layers, but the "
                f"model has {num_layers}"
            )
        return counts
    if num_layers < p:
        raise ValueError(
            f"pipeline_parallel_size {p} exceeds the number of layers ({num_layers}): every "
            "stage needs at least one layer"
        )
    counts = [num_layers // p] * p
    for i in range(2, num_layers % p + 2):  # vLLM's loop, exactly
        counts[-i] += 1
    return tuple(counts)


def layer_ranges(
    num_layers: int, pipeline_parallel_size: int, override: Sequence[int] | None = None
) -> tuple[range, ...]:
    """The P contiguous layer ranges of `layer_partition`."""
    ranges, start = [], 0
    for count in layer_partition(num_layers, pipeline_parallel_size, override):
        ranges.append(range(start, start + count))
        start += count
    return tuple(ranges)


def stage_meshes(mesh: Mesh) -> tuple[Mesh, ...]:
    """One `(data, stage, model)` sub-mesh per stage, each with a stage axis of size 1."""
    if mesh.shape["data"] != 1:
        raise ValueError("a pipeline runs inside one data-parallel replica (data axis of size 1)")
    return tuple(
        Mesh(mesh.devices[:, s : s + 1, :], mesh.axis_names, axis_types=mesh.axis_types)
        for s in range(mesh.shape["stage"])
    )


@dataclass(frozen=True)
class StageLayout:
    """Per stage: its mesh (None: the default device, no mesh) and its layer range."""

    meshes: tuple[Mesh | None, ...]
    ranges: tuple[range, ...]
    embed_params: tuple[str, ...]  # top-level parameters of the first stage

    @classmethod
    def build(
        cls,
        mesh: Mesh | None,
        num_layers: int,
        embed_params: tuple[str, ...],
        partition: Sequence[int] | None = None,
    ):
        """`partition`: layers per stage (`layer_partition`'s override); None: vLLM's default."""
        if mesh is None or mesh.shape["stage"] == 1:
            return cls((mesh,), layer_ranges(num_layers, 1, partition), embed_params)
        ranges = layer_ranges(num_layers, mesh.shape["stage"], partition)
        return cls(stage_meshes(mesh), ranges, embed_params)

    @property
    def num_stages(self) -> int:
        return len(self.ranges)

    def stage_of(self, path: str) -> int:
        """The stage that holds parameter `path` ("layers.7.q", "embed", "final_norm")."""
        if path.startswith("layers."):
            layer = int(path.split(".")[1])
            return next(s for s, r in enumerate(self.ranges) if layer in r)
        return 0 if path.split(".")[0] in self.embed_params else self.num_stages - 1

    def mesh_of(self, path: str) -> Mesh | None:
        return self.meshes[self.stage_of(path)]

    def stage_params(self, params: dict, tied_embedding: bool) -> tuple[dict, ...]:
        """Split the loaded parameter tree (each leaf already on its stage's devices) into one
        tree per stage; a tied embedding is copied, shard by shard, to the last stage too."""
        stages = []
        last = self.num_stages - 1
        for s, layers in enumerate(self.ranges):
            tree = {"layers": params["layers"][layers.start : layers.stop]}
            for name, value in params.items():
                if name != "layers" and self.stage_of(name) == s:
                    tree[name] = value
            if s == last and s > 0 and tied_embedding:
                embed = params["embed"]
                tree["embed"] = jax.device_put(
                    embed, NamedSharding(self.meshes[s], embed.sharding.spec)
                )
            stages.append(tree)
        return tuple(stages)


def hidden_sharding(mesh: Mesh | None) -> jax.sharding.Sharding | None:
    """Hidden states [T, E] between stages: whole on every device of the receiving stage (they
    are small, and every tensor-parallel shard of the next layer reads all of them)."""
    return None if mesh is None else NamedSharding(mesh, PartitionSpec())


def weight_sharding(layout: StageLayout, path: str, spec, shape) -> jax.sharding.Sharding:
    """Where parameter `path` lives: its stage's mesh, split by the logical-axis rules."""
    mesh = layout.mesh_of(path)
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return named_sharding(mesh, spec.logical_axes, shape)


@dataclass
class StageState:
    """One pipeline stage's device state and executables, held by the runner; the whole model
    when P == 1."""

    mesh: Mesh | None
    layers: range
    params: dict
    kv_cache: tuple
    jit: Callable  # (decode_rows) -> the jitted step (last stage) or stage forward (the others)
    static: dict  # the step's static arguments but decode_rows (multi-step decode binds them)
    executables: dict = field(default_factory=dict)  # Bucket -> Compiled
    writers: dict = field(default_factory=dict)  # token count -> Compiled cache writer
