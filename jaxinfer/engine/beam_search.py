"""Beam search over any engine that can score one next token: transformers' algorithm, vLLM's loop.

The loop is vLLM's (`LLM.beam_search`): each step, every live beam of every prompt is one request
`prompt + beam tokens` with `max_tokens=1` and `logprobs=K`; the engine's prefix cache serves the
blocks that beams share (the prompt, and the common past of sibling beams), so a step computes
little more than the new tails. `next_logprobs` is that call, so this module stays host code.

The choices are transformers' (`generate(num_beams=k, do_sample=False, length_penalty=lp,
early_stopping=False)`, transformers 5's `_beam_search`), which the results are tested against
token for token:
- each step the K = max(2, 1 + number of eos ids) * k best (beam, token) continuations by
  cumulative log-probability are ranked; the best k that do not end a beam run on;
- a continuation ends a beam if its token is an eos id (unless `ignore_eos`) or it is the
  `max_tokens`-th token; it joins the finished beams only if it ranked among the first k, with
  score `cum_logprob / generated_len ** length_penalty` (generated_len counts eos);
- the k best finished beams are kept; the search stops early once the best running beam's
  score at its current length cannot beat the worst of k finished ones (transformers' default
  `early_stopping=False` heuristic, exact when length_penalty <= 0);
- the result is the k finished beams, best score first.
vLLM's own loop differs where it is not transformers': it adds an eos continuation of any rank
to the finished beams, never stops early, and its length penalty counts the prompt and not eos.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from jaxinfer.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from jaxinfer.outputs import Logprob
from jaxinfer.sampling_params import SamplingParams

# The engine's answer for one beam: its top candidates for the next token -> log-probability.
NextLogprobs = Callable[[list[list[int]]], list[dict[int, float]]]


@dataclass(frozen=True, kw_only=True)
class Beam:
    """Generated tokens so far (the prompt not included), their log-probabilities summed, and
    the candidates seen at each step."""

    token_ids: tuple[int, ...] = ()
    cum_logprob: float = 0.0
    candidates: tuple[dict[int, float], ...] = ()

    def extend(self, token_id: int, logprob: float, candidates: dict[int, float]) -> Beam:
        return Beam(
            token_ids=(*self.token_ids, token_id),
            cum_logprob=self.cum_logprob + logprob,
            candidates=(*self.candidates, candidates),
        )


@dataclass(frozen=True, kw_only=True)
class FinishedBeam:
    beam: Beam
    score: float
    finish_reason: str  # "stop": it ended on eos; "length": max_tokens


@dataclass(kw_only=True)
class _Search:
    """One prompt's search state."""

    prompt_token_ids: list[int]
    running: list[Beam] = field(default_factory=lambda: [Beam()])
    finished: list[FinishedBeam] = field(default_factory=list)
    improvable: bool = True  # transformers' is_early_stop_heuristic_unsatisfied
    done: bool = False


def num_candidates(beam_width: int, num_eos_ids: int) -> int:
    """Continuations ranked per step (transformers' `beams_to_keep`): enough that k beams run on
    even if every beam's best tokens are eos. Also the logprobs asked per beam: the global top
    K are among each beam's own top K."""
    return max(2, 1 + num_eos_ids) * beam_width


def beam_search(
    prompts: Sequence[list[int]],
    params: BeamSearchParams,
    eos_token_ids: frozenset[int],
    next_logprobs: NextLogprobs,
    on_step: Callable[[], None] | None = None,
) -> list[list[FinishedBeam]]:
    """The `beam_width` best finished beams of each prompt, best first. All prompts' live beams
    go to the engine together, one `next_logprobs` call per step."""
    eos = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
    searches = [_Search(prompt_token_ids=list(prompt)) for prompt in prompts]
    for _ in range(params.max_tokens):
        live = [search for search in searches if not search.done]
        if not live:
            break
        sequences = [
            search.prompt_token_ids + list(beam.token_ids)
            for search in live
            for beam in search.running
        ]
        answers = iter(next_logprobs(sequences))
        for search in live:
            _advance(search, [next(answers) for _ in search.running], params, eos)
        if on_step is not None:
            on_step()
    return [search.finished for search in searches]


def _advance(
    search: _Search, answers: list[dict[int, float]], params: BeamSearchParams, eos: frozenset[int]
) -> None:
    """One step of transformers' `_beam_search` for one prompt."""
    width, penalty = params.beam_width, params.length_penalty
    ranked = sorted(
        (
            (beam.cum_logprob + logprob, index, token_id)
            for index, (beam, candidates) in enumerate(zip(search.running, answers, strict=True))
            for token_id, logprob in candidates.items()
        ),
        key=lambda candidate: -candidate[0],  # stable: ties keep beam order, then the engine's
    )[: num_candidates(width, len(eos))]
    generated_len = len(search.running[0].token_ids) + 1
    last_step = generated_len == params.max_tokens
    running: list[Beam] = []
    new_finished: list[FinishedBeam] = []
    for rank, (_, index, token_id) in enumerate(ranked):
        parent = search.running[index]
        beam = parent.extend(token_id, answers[index][token_id], answers[index])
        if token_id in eos or last_step:
            if rank < width and search.improvable:
                reason = "stop" if token_id in eos else "length"
                score = beam.cum_logprob / generated_len**penalty
                new_finished.append(FinishedBeam(beam=beam, score=score, finish_reason=reason))
        elif len(running) < width:
            running.append(beam)
    merged = sorted(search.finished + new_finished, key=lambda done: -done.score)
    search.finished = merged[:width]
    search.running = running
    if search.improvable and len(search.finished) == width and running:
        best_possible = running[0].cum_logprob / generated_len**penalty
        search.improvable = best_possible > search.finished[-1].score
    search.done = last_step or not search.improvable or not running


def run(
    engine,
    prompts,
    params: BeamSearchParams,
    prepare: Callable,
    use_tqdm: bool = False,
    concurrency_limit: int | None = None,
) -> list[BeamSearchOutput]:
    """`LLM.beam_search` on `engine` (an EngineCore or DataParallelEngine). `prepare(prompts,
    sampling_params)` is the LLM's intake. Every prompt and parameter is checked before the
    first step is queued."""
    if not isinstance(params, BeamSearchParams):
        raise TypeError(f"params must be BeamSearchParams, got {type(params).__name__}")
    if concurrency_limit is not None and (
        isinstance(concurrency_limit, bool)
        or not isinstance(concurrency_limit, int)
        or concurrency_limit < 1
    ):
        raise ValueError(
            f"concurrency_limit must be None or an int >= 1, got {concurrency_limit!r}"
        )
    limits = engine.limits
    eos = frozenset(getattr(engine, "eos_token_ids", limits.eos_token_ids))
    count = num_candidates(params.beam_width, 0 if params.ignore_eos else len(eos))
    if limits.max_logprobs != -1 and count > limits.max_logprobs:
        raise ValueError(
            f"BeamSearchParams.beam_width={params.beam_width} ranks {count} candidates per beam "
            f"each step, more than the engine's max_logprobs={limits.max_logprobs}: lower "
            "beam_width or raise max_logprobs"
        )
    prepared = prepare(prompts, SamplingParams(max_tokens=params.max_tokens, ignore_eos=True))
    for index, request in enumerate(prepared):
        total = len(request.prompt_token_ids) + params.max_tokens
        if total > limits.max_model_len:
            raise ValueError(
                f"prompts[{index}]: {len(request.prompt_token_ids)} prompt tokens + "
                f"BeamSearchParams.max_tokens={params.max_tokens} = {total} exceeds "
                f"max_model_len={limits.max_model_len}"
            )
    step_params = SamplingParams(
        max_tokens=1, temperature=0.0, logprobs=count, ignore_eos=True, detokenize=False
    )

    def next_logprobs(sequences: list[list[int]]) -> list[dict[int, float]]:
        requests = prepare([{"prompt_token_ids": ids} for ids in sequences], step_params)
        outputs = engine.generate_prepared(requests, use_tqdm=False)
        return [
            {token_id: entry.logprob for token_id, entry in output.outputs[0].logprobs[0].items()}
            for output in outputs
        ]

    prompt_ids = [request.prompt_token_ids for request in prepared]
    chunk = concurrency_limit or max(1, len(prompt_ids))
    results: list[list[FinishedBeam]] = []
    with tqdm(
        total=params.max_tokens * -(-len(prompt_ids) // chunk),
        desc="Beam search",
        unit="token",
        disable=not use_tqdm,
    ) as bar:
        for start in range(0, len(prompt_ids), chunk):
            batch = prompt_ids[start : start + chunk]
            results += beam_search(batch, params, eos, next_logprobs, lambda: bar.update(1))
    return [
        BeamSearchOutput(sequences=[_sequence(ids, done, engine.tokenizer) for done in finished])
        for ids, finished in zip(prompt_ids, results, strict=True)
    ]


def _sequence(prompt_ids: list[int], done: FinishedBeam, tokenizer) -> BeamSearchSequence:
    """vLLM's BeamSearchSequence: prompt + generated ids; the text leaves a final eos out."""
    generated = list(done.beam.token_ids)
    shown = generated[:-1] if done.finish_reason == "stop" else generated
    return BeamSearchSequence(
        tokens=list(prompt_ids) + generated,
        logprobs=[
            {token_id: Logprob(logprob=value) for token_id, value in step.items()}
            for step in done.beam.candidates
        ],
        cum_logprob=done.beam.cum_logprob,
        text=tokenizer.decode(shown) if tokenizer is not None else None,
        finish_reason=done.finish_reason,
    )
