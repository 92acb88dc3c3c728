"""The offline loops over an EngineCore: run a batch to completion (`generate`), or stream one.

Both are nothing but `add_request` and `step()` calls, as vLLM's `LLM._run_engine` is; if the
caller is interrupted (Ctrl-C, an exception, a generator closed early) the requests it added are
aborted before the interrupt propagates, so their KV blocks and sampling slots are free again and
the engine is ready for the next call.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Iterator

from tqdm.auto import tqdm

from jaxinfer.engine.intake import PreparedRequest
from jaxinfer.outputs import RequestOutput
from jaxinfer.sampling_params import RequestOutputKind


def generate(core, prepared: list[PreparedRequest], use_tqdm: bool = True) -> list[RequestOutput]:
    """Add every request (FINAL_ONLY, as vLLM's offline generate) and step until all finish;
    -> their outputs in input order."""
    ids = []
    outputs: dict[str, RequestOutput] = {}
    try:
        for request in prepared:
            request_id = core.next_request_id()
            params = dataclasses.replace(request.params, output_kind=RequestOutputKind.FINAL_ONLY)
            ids.append(request_id)  # first: aborting an id that was never added is a no-op
            core.add_prepared(request_id, dataclasses.replace(request, params=params))
        wanted = set(ids)
        with _Progress(core, len(ids), use_tqdm) as progress:
            while len(outputs) < len(ids):
                for output in core.step():
                    if output.finished and output.request_id in wanted:
                        raise_if_failed(output, ids.index(output.request_id))
                        outputs[output.request_id] = output
                        progress.update(1)
    except BaseException:
        core.abort_request(ids)  # never leave blocks behind on an interrupted call
        raise
    return [outputs[request_id] for request_id in ids]


def stream(core, prepared: PreparedRequest) -> Iterator[RequestOutput]:
    """One request's outputs as they come (DELTA unless its params ask for another kind).

    Other requests in the core keep running in the same steps; their outputs are not ours and
    are dropped here, so mix `stream()` with the core's own loop (or AsyncEngine) with care."""
    params = prepared.params
    if params.output_kind is RequestOutputKind.CUMULATIVE:
        params = dataclasses.replace(params, output_kind=RequestOutputKind.DELTA)
    request_id = core.next_request_id()
    core.add_prepared(request_id, dataclasses.replace(prepared, params=params))
    finished = False
    streamed: Counter[int] = Counter()  # tokens yielded so far, per sample
    try:
        while not finished:
            for output in core.step():
                if output.request_id == request_id:
                    finished = output.finished
                    raise_if_failed(output, 0, streamed)
                    for completion in output.outputs:  # DELTA: count what came before
                        streamed[completion.index] += len(completion.token_ids)
                    yield output
    finally:
        if not finished:
            core.abort_request(request_id)


class NonFiniteLogitsError(RuntimeError):
    """A request's logits were not finite (NaN or inf), so no token could be sampled for it.

    The engine has already ended it (finish_reason "error", blocks and slots freed); this names
    it: `request_id`, `prompt_index` (its place in the call's prompts), `num_tokens` (the tokens
    it had generated before)."""

    def __init__(self, request_id: str, prompt_index: int, num_tokens: int) -> None:
        self.request_id, self.prompt_index, self.num_tokens = request_id, prompt_index, num_tokens
        super().__init__(
            f"request {request_id} (prompt {prompt_index} of this call): the model's logits were "
            f"not finite (NaN or inf) after {num_tokens} generated token(s), so no token could be "
            "sampled; the request was stopped and its KV blocks freed. Likely causes: non-finite "
            "weights (EngineConfig.check_weights_finite finds them at load) or activations that "
            "overflow the dtype (float16 ends at 65504: try bfloat16 or float32)"
        )


def raise_if_failed(
    output: RequestOutput, prompt_index: int, streamed: dict[int, int] | None = None
) -> None:
    """Raise `NonFiniteLogitsError` for a request the engine ended with finish_reason "error".
    `streamed`: tokens of each sample delivered in earlier deltas."""
    for completion in output.outputs:
        if completion.finish_reason == "error":
            earlier = streamed[completion.index] if streamed is not None else 0
            count = earlier + len(completion.token_ids)
            raise NonFiniteLogitsError(output.request_id, prompt_index, count)


class _Progress:
    """vLLM's progress bar: prompts done, and input/output tokens per second."""

    def __init__(self, core, total: int, enabled: bool) -> None:
        self.core = core
        self.bar = tqdm(total=total, desc="Processed prompts", disable=not enabled)
        self.started = time.perf_counter()
        self.start_stats = dataclasses.replace(core.stats)

    def update(self, count: int) -> None:
        self.bar.update(count)
        if self.bar.disable:
            return
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        prompt = self.core.stats.prompt_tokens - self.start_stats.prompt_tokens
        generated = self.core.stats.generation_tokens - self.start_stats.generation_tokens
        text = (  # vLLM's wording
            f"est. speed input: {prompt / elapsed:.2f} toks/s, "
            f"output: {generated / elapsed:.2f} toks/s"
        )
        stats = self.core.stats
        queries = stats.prefix_cache_queries - self.start_stats.prefix_cache_queries
        if queries:
            hits = stats.prefix_cache_hits - self.start_stats.prefix_cache_hits
            text += f", prefix cache hit rate: {100 * hits / queries:.1f}%"
        self.bar.set_postfix_str(text)

    def compiling(self, what: str) -> None:
        """Shown while a shape compiles: otherwise the bar sits at 0 tok/s with no reason given."""
        self.bar.set_postfix_str(f"compiling {what}")

    def __enter__(self) -> _Progress:
        if not self.bar.disable and self.core.runner is not None:
            self.core.runner.compile_listener = self.compiling
        return self

    def __exit__(self, *exc) -> None:
        if self.core.runner is not None:
            self.core.runner.compile_listener = None
        self.bar.close()
