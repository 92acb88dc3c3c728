"""The device functions: a padded batch in, sampled tokens and the step's new K/V out; then the write.

Both are pure. The runner compiles `step` once per bucket and `write_cache` once per token count.
They are two calls, not one, because XLA:CPU copies the whole cache when a single computation both
gathers from it and scatters into it; apart, `write_cache` updates the donated cache in place.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

import jax
import jax.numpy as jnp

from jaxinfer.runtime.sampling import sample, top_logprobs
from jaxinfer.runtime.slot_state import SlotState, batch_tensors, count_sampled
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

    def attention(q, k_new, v_new, layer_cache):
        k_cache, v_cache = layer_cache
        return paged_attention(
            q,
            k_new,
            v_new,
            k_cache,
            v_cache,
            inputs["block_tables"],
            inputs["context_lens"],
            inputs["query_start_loc"],
            scale=scale,
            decode_only=decode_only,
            sliding_window=sliding_window,
        )

    return attention


def forward_logits(
    params: dict,
    kv_cache: tuple,
    inputs: dict[str, jax.Array],
    logits_indices: jax.Array,
    *,
    family: ModuleType,
    model_config,
    decode_only: bool,
) -> tuple[jax.Array, tuple]:
    attention = make_attention(
        inputs,
        scale=model_config.head_dim**-0.5,
        decode_only=decode_only,
        sliding_window=model_config.sliding_window,
    )
    return family.forward(
        params,
        model_config,
        kv_cache,
        inputs["token_ids"],
        inputs["positions"],
        logits_indices,
        attention,
    )


def step(
    params: dict,
    kv_cache: tuple,
    slot_state: SlotState,
    inputs: dict,
    *,
    family: ModuleType,
    model_config,
    decode_only: bool,
    max_top_k: int,
    num_logprobs: int,
) -> tuple[dict[str, jax.Array], tuple, SlotState]:
    """-> (sampled tokens and their logprobs, per layer the new (k, v) [T, K, D], new slot state).

    Outputs, each per row [S]: `tokens`, `token_logprob` (raw log-softmax, vLLM's default),
    `token_rank`; and [S, num_logprobs]: `top_ids`, `top_logprobs`. The top-k search runs only
    when some row asked for logprobs.
    """
    logits, new_kv = forward_logits(
        params,
        kv_cache,
        inputs,
        inputs["logits_indices"],
        family=family,
        model_config=model_config,
        decode_only=decode_only,
    )
    slots = inputs["slots"]
    tensors = batch_tensors(slot_state, slots, inputs["sampling"], inputs["banned"])
    tokens, raw_logprobs = sample(logits, tensors, max_top_k)
    num_rows = tokens.shape[0]

    def with_logprobs():
        return top_logprobs(raw_logprobs, tokens, num_logprobs)

    def without_logprobs():
        token_logprob = jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
        return (
            token_logprob,
            jnp.zeros(num_rows, jnp.int32),
            jnp.zeros((num_rows, num_logprobs), jnp.int32),
            jnp.zeros((num_rows, num_logprobs), jnp.float32),
        )

    token_logprob, rank, top_ids, top_values = jax.lax.cond(
        jnp.any(inputs["want_logprobs"]), with_logprobs, without_logprobs
    )
    outputs = {
        "tokens": tokens,
        "token_logprob": token_logprob,
        "token_rank": rank,
        "top_ids": top_ids,
        "top_logprobs": top_values,
    }
    return outputs, new_kv, count_sampled(slot_state, slots, tokens, inputs["sampled"])


def all_token_logits(params, kv_cache, inputs, *, family: ModuleType, model_config):
    """Logits of every token of a prefill [T, V] (parity tests, prompt logprobs)."""
    num_tokens = inputs["token_ids"].shape[0]
    logits, _ = forward_logits(
        params,
        kv_cache,
        inputs,
        jnp.arange(num_tokens),
        family=family,
        model_config=model_config,
        decode_only=False,
    )
    return logits


def write_cache(kv_cache: tuple, new_kv: tuple, slot_mapping: jax.Array) -> tuple:
    """Scatter every layer's new K/V into its cache slots (padding tokens land in block 0)."""
    return tuple(
        reference.write_kv(k_cache, v_cache, k_new, v_new, slot_mapping)
        for (k_cache, v_cache), (k_new, v_new) in zip(kv_cache, new_kv, strict=True)
    )


def jit_step(
    family: ModuleType, model_config, decode_only: bool, max_top_k: int, num_logprobs: int
):
    """The step, compiled per bucket. Only the slot state is donated: the cache is read here and
    written by `write_cache` (see the module docstring)."""
    return jax.jit(
        functools.partial(
            step,
            family=family,
            model_config=model_config,
            decode_only=decode_only,
            max_top_k=max_top_k,
            num_logprobs=num_logprobs,
        ),
        donate_argnums=(2,),
    )


jit_write_cache = jax.jit(write_cache, donate_argnums=(0,))
