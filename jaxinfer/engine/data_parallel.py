"""Data parallelism: D independent engine replicas over disjoint device groups.

`Engine(EngineConfig(data_parallel_size=D, tensor_parallel_size=T))` builds a `DataParallelEngine`:
replica r is an ordinary `Engine` on devices[r*T:(r+1)*T] (its own weights, KV cache, scheduler and
compiled steps; with T == 1 a one-device mesh commits everything to its device). A `generate()`
call is one shared queue: requests are tokenized and validated here, each gets the seed one engine
would give it (its own, or `request_seed(engine seed, request index)`), they are split across the
replicas balancing their token counts, and the replicas run concurrently in threads (JAX releases
the GIL while a step executes). A request's tokens depend only on its prompt, parameters and seed,
so the outputs, in input order and with one engine's request ids, are those of a single replica.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as SequenceABC
from concurrent.futures import ThreadPoolExecutor, as_completed

from tqdm.auto import tqdm

from jaxinfer.config import EngineConfig
from jaxinfer.engine.engine import Engine, PromptType, _as_config, request_seed
from jaxinfer.outputs import RequestOutput
from jaxinfer.sampling_params import SamplingParams


class DataParallelEngine(Engine):
    """D `Engine` replicas behind one `generate()`/`chat()`; built by `Engine(...)` when
    `data_parallel_size > 1`. `replicas[r].mesh` spans the r-th device group."""

    def __init__(self, config: EngineConfig | str | None = None, *, devices=None, **kwargs) -> None:
        from jaxinfer.runtime.mesh import build_mesh  # device side: imported late

        config = _as_config(config, kwargs)
        size = config.data_parallel_size
        grid = build_mesh(  # the first D x P x T devices, as [D, P, T]; raises if too few
            config.tensor_parallel_size, config.pipeline_parallel_size, size, devices
        ).devices
        replica_config = config.replace(data_parallel_size=1)
        self.replicas: list[Engine] | None = []
        try:
            for group in grid.reshape(size, -1):
                self.replicas.append(Engine(replica_config, devices=list(group)))
        except BaseException:
            self.shutdown()
            raise
        first = self.replicas[0]
        if first.embedder is not None:
            self.shutdown()
            raise ValueError(
                "data_parallel_size > 1 serves generative models; for an encoder model run one "
                "Engine per device group"
            )
        self.config = first.config.replace(data_parallel_size=size)
        self.mesh = None  # each replica has its own
        self._multi_process = False  # replicas of one process
        self.model = first.model  # shared description (model_config, hf_config); weights differ
        self.tokenizer = first.tokenizer
        self.embedder = None
        self.eos_token_ids = first.eos_token_ids
        self.default_sampling_params = first.default_sampling_params
        self._num_requests = 0

    @property
    def num_compilations(self) -> int:
        return sum(replica.num_compilations for replica in self._live_replicas())

    def warmup(self) -> int:
        """Compile every bucket on every replica (concurrently). Returns the total count."""
        replicas = self._live_replicas()
        with ThreadPoolExecutor(len(replicas)) as pool:
            list(pool.map(Engine.warmup, replicas))
        return self.num_compilations

    def generate(
        self,
        prompts: PromptType | SequenceABC[PromptType],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion on the replicas; outputs come back in input order."""
        replicas = self._live_replicas()
        encoded, params_list = self._prepare(prompts, sampling_params)
        first = self._num_requests
        self._num_requests += len(encoded)
        prompts_in = [{"prompt": text, "prompt_token_ids": ids} for text, ids in encoded]
        params_in = [
            params
            if params.seed is not None
            else dataclasses.replace(params, seed=request_seed(self.config.seed, first + i))
            for i, params in enumerate(params_list)
        ]
        costs = [self._cost(ids, params) for (_, ids), params in zip(encoded, params_in)]
        shares = balance(costs, len(replicas))
        outputs: list[RequestOutput | None] = [None] * len(encoded)
        progress = tqdm(total=len(encoded), desc="Processed prompts", disable=not use_tqdm)
        try:
            with ThreadPoolExecutor(len(replicas)) as pool:
                futures = {
                    pool.submit(
                        replica.generate,
                        [prompts_in[i] for i in share],
                        [params_in[i] for i in share],
                        use_tqdm=False,
                    ): share
                    for replica, share in zip(replicas, shares, strict=True)
                    if share
                }
                for future in as_completed(futures):
                    share = futures[future]
                    for i, output in zip(share, future.result(), strict=True):
                        output.request_id = str(first + i)  # as one engine numbers them
                        outputs[i] = output
                    progress.update(len(share))
        finally:
            progress.close()
        return outputs

    def shutdown(self) -> None:
        """Shut every replica down."""
        for replica in self.replicas or ():
            replica.shutdown()
        self.replicas = None
        self.model = None

    def _live_replicas(self) -> list[Engine]:
        if not self.replicas:
            raise RuntimeError("this engine was shut down: build a new Engine")
        return self.replicas

    def _cost(self, token_ids: list[int], params: SamplingParams) -> int:
        """A request's work in tokens: its prompt and, per sample, what it may generate."""
        room = self.config.max_model_len - len(token_ids)
        new = room if params.max_tokens is None else min(params.max_tokens, room)
        return len(token_ids) + params.n * new


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
