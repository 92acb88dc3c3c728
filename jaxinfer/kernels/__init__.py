"""Native kernels behind `jax.ffi` (built on first use: native_build.py) for what XLA does not do well."""
