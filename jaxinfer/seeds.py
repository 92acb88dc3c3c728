"""Key seeds of requests and samples: plain integer functions, fixed across runs and versions.

A request's tokens depend only on its prompt, parameters and seed (DESIGN principle 3), so these
two functions are the whole story of where randomness comes from: an unseeded request's seed is a
function of the engine seed and its submission index, and sample i of a request draws with
`row_seed(request seed, i)`; the device folds the output position into that key. Host and device
both use them, so they live outside `engine/` and `runtime/`.
"""

from __future__ import annotations

import numpy as np

_UINT32 = 1 << 32


def request_seed(engine_seed: int, request_index: int) -> int:
    """The key seed of an unseeded request: a function of the engine seed and submission order."""
    return int(np.random.SeedSequence([engine_seed, request_index]).generate_state(1)[0])


def row_seed(seed: int, sample_index: int = 0) -> int:
    """The uint32 seed of one sample of a request: `seed` itself for sample 0 when it fits.

    Other samples (and seeds >= 2**32) go through the splitmix64 finalizer, a fixed bijective
    mix, so the n samples of a request draw independent streams and the mapping never changes
    between runs or versions. A request without a seed gets one from the engine first.

    Seeds are in [0, 2**64) (SamplingParams checks it): there, distinct seeds give distinct
    64-bit mixes for the same sample index, so the only collisions are those of keeping 32 of
    the 64 bits (about one in 2**32 per pair); seeds below 2**32 never collide with each other
    for sample 0, which is the seed itself.
    """
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if sample_index == 0 and seed < _UINT32:
        return seed
    mask = (1 << 64) - 1
    x = (seed * 0x9E3779B97F4A7C15 + sample_index + 1) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return (x ^ (x >> 31)) % _UINT32
