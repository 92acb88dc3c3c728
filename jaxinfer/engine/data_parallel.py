"""Data parallelism: D independent engine replicas over disjoint device groups.

`LLM(..., data_parallel_size=D, tensor_parallel_size=T)` gets a `DataParallelEngine` composed of D
`EngineCore`s, replica r on devices[r*T:(r+1)*T] (its own weights, KV cache, scheduler and compiled
steps), built by `jaxinfer.llm.build_engine`. A `generate()` call is one shared queue: requests are
validated once, each gets the seed one engine would give it (its own, or `request_seed(engine
seed, request index)`), they are split across the replicas balancing their token counts, and the
replicas run concurrently in threads (JAX releases the GIL while a step executes). A request's
tokens depend only on its prompt, parameters and seed, so the outputs, in input order and with one
engine's request ids, are those of a single replica.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor, as_completed

from tqdm.auto import tqdm

from jaxinfer.config import EngineConfig
from jaxinfer.engine.intake import PreparedRequest
from jaxinfer.engine.offline import NonFiniteLogitsError
from jaxinfer.outputs import RequestOutput
from jaxinfer.seeds import request_seed


class DataParallelEngine:
    """D replicas behind one `generate()`; `replicas[r].mesh` spans the r-th device group."""

    def __init__(self, config: EngineConfig, replicas: list) -> None:
        from jaxinfer.engine.core import EngineCore

        if not all(isinstance(replica, EngineCore) for replica in replicas):
            for replica in replicas:
                replica.shutdown()
            raise ValueError(
                "data_parallel_size > 1 serves generative models; for an encoder model run one "
                "LLM per device group"
            )
        self.replicas = replicas
        first = replicas[0]
        self.config = first.config.replace(data_parallel_size=config.data_parallel_size)
        self.model = first.model  # shared description (model_config, hf_config); weights differ
        self.tokenizer = first.tokenizer
        self.limits = first.limits
        self.vocab_size = first.vocab_size
        self.default_sampling_params = first.default_sampling_params
        self._num_requests = 0

    def check_grammars(self, prepared: list, first_index: int = 0) -> None:
        """EngineCore.check_grammars (the replicas share one tokenizer)."""
        self.replicas[0].check_grammars(prepared, first_index)

    @property
    def model_config(self) -> EngineConfig:
        """vLLM's `llm_engine.model_config` (see EngineCore.model_config): the engine config."""
        return self.config

    @property
    def num_compilations(self) -> int:
        return sum(replica.num_compilations for replica in self._live_replicas())

    def warmup(self) -> int:
        """Compile every bucket on every replica (concurrently). Returns the total count."""
        replicas = self._live_replicas()
        with ThreadPoolExecutor(len(replicas)) as pool:
            list(pool.map(lambda replica: replica.warmup(), replicas))
        return self.num_compilations

    def generate_prepared(
        self, prepared: list[PreparedRequest], use_tqdm: bool = True
    ) -> list[RequestOutput]:
        """Run validated requests to completion on the replicas; outputs in input order."""
        replicas = self._live_replicas()
        first = self._num_requests
        self._num_requests += len(prepared)
        seeded = [
            request
            if request.params.seed is not None
            else dataclasses.replace(
                request,
                params=dataclasses.replace(
                    request.params, seed=request_seed(self.config.seed, first + i)
                ),
            )
            for i, request in enumerate(prepared)
        ]
        shares = balance([self._cost(request) for request in seeded], len(replicas))
        outputs: list[RequestOutput | None] = [None] * len(seeded)
        progress = tqdm(total=len(seeded), desc="Processed prompts", disable=not use_tqdm)
        try:
            with ThreadPoolExecutor(len(replicas)) as pool:
                futures = {
                    pool.submit(
                        replica.generate_prepared, [seeded[i] for i in share], use_tqdm=False
                    ): share
                    for replica, share in zip(replicas, shares, strict=True)
                    if share
                }
                for future in as_completed(futures):
                    share = futures[future]
                    try:
                        results = future.result()
                    except NonFiniteLogitsError as error:  # named as one engine numbers them
                        index = share[error.prompt_index]
                        raise NonFiniteLogitsError(
                            str(first + index), index, error.num_tokens
                        ) from None
                    for i, output in zip(share, results, strict=True):
                        output.request_id = str(first + i)  # as one engine numbers them
                        outputs[i] = output
                    progress.update(len(share))
        finally:
            progress.close()
        return outputs

    def reset_prefix_cache(self) -> bool:
        """Reset every replica's prefix cache (each keeps its own); False if any refused."""
        return all(
            [replica.reset_prefix_cache() for replica in self._live_replicas()]
        )  # every one, no short cut

    def shutdown(self) -> None:
        """Shut every replica down."""
        for replica in self.replicas or ():
            replica.shutdown()
        self.replicas = None
        self.model = None

    def _live_replicas(self) -> list:
        if not self.replicas:
            raise RuntimeError("this engine was shut down: build a new LLM")
        return self.replicas

    def _cost(self, request: PreparedRequest) -> int:
        """A request's work in tokens: its prompt and, per sample, what it may generate."""
        prompt = len(request.prompt_token_ids)
        room = self.config.max_model_len - prompt
        params = request.params
        new = room if params.max_tokens is None else min(params.max_tokens, room)
        return prompt + params.n * new


def balance(costs: list[int], num_replicas: int) -> list[list[int]]:
    """Split request indices over replicas: largest first onto the least-loaded replica (ties to
    the lower index), each share in input order. Deterministic."""
    shares: list[list[int]] = [[] for _ in range(num_replicas)]
    loads = [0] * num_replicas
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(num_replicas), key=lambda r: (loads[r], r))
        shares[r].append(i)
        loads[r] += costs[i]
    return [sorted(share) for share in shares]
