"""Per-row sampling: greedy or temperature sampling, each row keyed by its own seed and position.

A row's key is `fold_in(key(seed), output_position)`, so the token a request draws never depends on
which other requests share the batch, on the bucket, or on preemption. The full vLLM pipeline
(penalties, top-k/top-p/min-p, logprobs) builds on this shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GREEDY_TEMPERATURE = 1e-5  # vLLM: temperatures below this mean greedy


def _sample_row(
    logits: jax.Array,  # [V] float32
    temperature: jax.Array,  # []
    seed: jax.Array,  # [] uint32
    position: jax.Array,  # [] int32
) -> jax.Array:
    key = jax.random.fold_in(jax.random.key(seed), position)
    safe_temperature = jnp.maximum(temperature, GREEDY_TEMPERATURE)
    sampled = jax.random.categorical(key, logits / safe_temperature)
    return jnp.where(temperature < GREEDY_TEMPERATURE, jnp.argmax(logits), sampled)


def sample(
    logits: jax.Array,  # [S, V] float32
    temperatures: jax.Array,  # [S]
    seeds: jax.Array,  # [S] uint32
    positions: jax.Array,  # [S] int32
) -> tuple[jax.Array, jax.Array]:
    """-> (tokens [S] int32, logprob of each token under the raw model distribution [S]).

    An all-greedy batch skips the random draws: Gumbel noise over the whole vocabulary costs
    several times the argmax on CPU (measured ~80 ms vs ~9 ms for 32 rows x 49k vocab), and a
    `lax.cond` outside the vmap really runs one branch only. Greedy rows give the same token either
    way, so the choice of branch cannot change any output.
    """
    tokens = jax.lax.cond(
        jnp.any(temperatures >= GREEDY_TEMPERATURE),
        lambda: jax.vmap(_sample_row)(logits, temperatures, seeds, positions),
        lambda: jnp.argmax(logits, axis=-1),
    ).astype(jnp.int32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    return tokens, jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
