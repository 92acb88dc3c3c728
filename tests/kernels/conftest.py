"""On a GPU, float32 dots in these tests are full float32.

JAX computes float32 dots in TF32 on recent NVIDIA GPUs unless asked otherwise (JAX's "Matmul
precision" guide), while the kernel asks for full precision in float32 and XLA:CPU always gives
it; the reference would then be ~1e-3 off and the 1e-5 float32 tolerances would judge TF32, not
the kernel. Nothing changes on CPU. `benchmarks/gpu_check.sh` runs this folder on a GPU.
"""

from __future__ import annotations

import jax

if jax.default_backend() == "gpu":
    jax.config.update("jax_default_matmul_precision", "highest")
