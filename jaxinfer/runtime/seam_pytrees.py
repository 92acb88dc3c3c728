"""The seam's dataclasses as JAX pytrees, and their abstract shapes for ahead-of-time compiles.

`jaxinfer/seam.py` declares every step input and output once (shape letters and dtype) without
importing JAX; this module registers those classes with `jax.tree_util.register_dataclass` (every
field is data, none static) so a compiled step takes a `StepInputs` and returns a `StepOutputs`,
and turns a bucket's declared shapes into the `ShapeDtypeStruct`s the runner lowers against.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Sharding

from jaxinfer.seam import Bucket, SamplingScalars, StepInputs, StepOutputs

for _cls in (SamplingScalars, StepInputs, StepOutputs):
    jax.tree_util.register_dataclass(
        _cls, data_fields=[f.name for f in dataclasses.fields(_cls)], meta_fields=[]
    )


def _is_spec(leaf: object) -> bool:
    return isinstance(leaf, tuple) and len(leaf) == 2 and isinstance(leaf[0], tuple)


def abstract_inputs(
    bucket: Bucket, sharding: Sharding | None = None, *, vocab_size: int
) -> StepInputs:
    """One bucket's StepInputs as ShapeDtypeStructs (placed by `sharding`, if given)."""
    return jax.tree.map(
        lambda spec: jax.ShapeDtypeStruct(spec[0], spec[1], sharding=sharding),
        StepInputs.spec(bucket, vocab_size=vocab_size),
        is_leaf=_is_spec,
    )
