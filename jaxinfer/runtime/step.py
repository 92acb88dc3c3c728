"""The one device function: a padded batch in, sampled tokens and the updated KV cache out.

`step` is pure; the runner jit-compiles it once per bucket with the KV cache donated, so XLA
updates the cache in place instead of copying it every step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

import jax

from jaxinfer.runtime.sampler import sample
from pallas_kernels import reference


def make_attention(
    inputs: dict[str, jax.Array],
    *,
    scale: float,
    decode_only: bool,
    sliding_window: int | None,
    paged_attention: Callable = reference.paged_attention,
) -> Callable:
    """Bind the step's block tables and lengths into the per-layer attention call of the model."""

    def attention(q, k_new, v_new, kv):
        k_cache, v_cache = reference.write_kv(*kv, k_new, v_new, inputs["slot_mapping"])
        out = paged_attention(
            q,
            k_cache,
            v_cache,
            inputs["block_tables"],
            inputs["context_lens"],
            inputs["query_start_loc"],
            scale=scale,
            decode_only=decode_only,
            sliding_window=sliding_window,
        )
        return out, (k_cache, v_cache)

    return attention


def step(
    params: dict,
    kv_cache: tuple,
    inputs: dict[str, jax.Array],
    *,
    family: ModuleType,
    model_config,
    decode_only: bool,
) -> tuple[jax.Array, jax.Array, tuple]:
    """-> (next tokens [S], their logprobs [S], new kv_cache)."""
    attention = make_attention(
        inputs,
        scale=model_config.head_dim**-0.5,
        decode_only=decode_only,
        sliding_window=model_config.sliding_window,
    )
    logits, kv_cache = family.forward(
        params,
        model_config,
        kv_cache,
        inputs["token_ids"],
        inputs["positions"],
        inputs["logits_indices"],
        attention,
    )
    tokens, logprobs = sample(
        logits, inputs["temperatures"], inputs["seeds"], inputs["sample_positions"]
    )
    return tokens, logprobs, kv_cache


def prefill_logits(params, kv_cache, inputs, *, family: ModuleType, model_config):
    """Logits of every token of a prefill (for parity tests and prompt logprobs)."""
    attention = make_attention(
        inputs,
        scale=model_config.head_dim**-0.5,
        decode_only=False,
        sliding_window=model_config.sliding_window,
    )
    num_tokens = inputs["token_ids"].shape[0]
    logits, kv_cache = family.forward(
        params,
        model_config,
        kv_cache,
        inputs["token_ids"],
        inputs["positions"],
        jax.numpy.arange(num_tokens),
        attention,
    )
    return logits, kv_cache


def jit_step(family: ModuleType, model_config, decode_only: bool):
    return jax.jit(
        functools.partial(step, family=family, model_config=model_config, decode_only=decode_only),
        donate_argnums=(1,),
    )
