"""From sampled tokens to what the caller sees: logprobs, stop conditions, text, RequestOutputs.

Text is decoded from the whole output each time it is needed (exact: a tokenizer may rewrite
earlier characters as more bytes arrive), and only when someone will read it: a FINAL_ONLY
request (what `generate()` asks for) is decoded once, when it finishes; a streamed one each step it
progresses. A streamed delta never ends inside a multi-byte character (text ending in U+FFFD is
held back until the character completes) and, when the request has stop strings, holds back the
last `len(longest stop) - 1` characters, which could be the start of a stop string that the stop
check would cut away. Deltas therefore concatenate exactly to the final text.
"""

from __future__ import annotations

import numpy as np

from jaxinfer.engine.request import Request, Sample
from jaxinfer.outputs import CompletionOutput, Logprob, RequestOutput
from jaxinfer.sampling_params import RequestOutputKind
from jaxinfer.seam import StepOutputs

_INCOMPLETE = "\ufffd"  # what a byte-level tokenizer decodes a partial UTF-8 character to


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int], vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size
        self._token_text: dict[int, str] = {}

    # ---- per step -----------------------------------------------------------------------------

    def record_logprobs(self, request: Request, sample: Sample, out: StepOutputs, row: int) -> None:
        logprob = float(out.token_logprob[row])
        sample.cumulative_logprob += logprob
        k = self._top_count(request.params.logprobs)
        if k is None:
            return
        sample.logprobs.append(
            self._logprob_entry(
                int(out.tokens[row]),
                logprob,
                int(out.token_rank[row]),
                out.top_ids[row, :k],
                out.top_logprobs[row, :k],
            )
        )

    def record_prompt_logprobs(
        self, request: Request, start: int, count: int, first: int, out: StepOutputs
    ) -> None:
        """Logprobs of prompt tokens start+1 .. start+count, from a prefill chunk whose first
        token is token `first` of the step."""
        k = self._top_count(request.params.prompt_logprobs)
        if k is None:
            return
        prompt = request.prompt_token_ids
        for j in range(count):
            position = start + j + 1  # the prompt token this logprob is for
            if position >= len(prompt):
                break
            t = first + j
            request.prompt_logprobs[position] = self._logprob_entry(
                prompt[position],
                float(out.prompt_logprob[t]),
                int(out.prompt_rank[t]),
                out.prompt_top_ids[t, :k],
                out.prompt_top_logprobs[t, :k],
            )

    def stop_reason(self, request: Request, sample: Sample) -> tuple[str, int | str | None] | None:
        """(finish_reason, stop_reason) if the sample's newest token ends it, else None."""
        params, seq = request.params, sample.seq
        token = seq.output_token_ids[-1]
        if not params.ignore_eos and token in self.eos_token_ids:
            return "stop", None
        if token in params.stop_token_ids:
            return "stop", token
        matcher = sample.stop_matcher
        if (
            matcher is not None
            and seq.num_output_tokens >= params.min_tokens
            and (stop := matcher.update(seq.output_token_ids)) is not None
        ):
            return "stop", stop
        if seq.num_output_tokens >= seq.max_tokens:
            return "length", None
        return None

    # ---- outputs ------------------------------------------------------------------------------

    def make_output(self, request: Request) -> RequestOutput | None:
        """The caller's view of `request` now, by its `output_kind`; None if nothing to say."""
        kind = request.params.output_kind
        finished = request.finished
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        delta = kind is RequestOutputKind.DELTA
        completions = []
        for sample in request.samples:
            if delta:
                completion = self._delta(request, sample)
                if completion is not None:
                    completions.append(completion)
            else:
                completions.append(self._cumulative(request, sample))
        if delta and not completions:
            return None
        prompt_logprobs = None
        if not delta or not request.prompt_logprobs_sent:
            prompt_logprobs = self._prompt_logprobs(request)
            request.prompt_logprobs_sent = prompt_logprobs is not None
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=list(request.prompt_token_ids),
            prompt_logprobs=prompt_logprobs,
            outputs=completions,
            finished=finished,
        )

    def _cumulative(self, request: Request, sample: Sample) -> CompletionOutput:
        seq, params = sample.seq, request.params
        return CompletionOutput(
            index=sample.index,
            text=self._text(request, sample, final=seq.is_finished),
            token_ids=list(seq.output_token_ids),
            cumulative_logprob=sample.cumulative_logprob if params.logprobs is not None else None,
            logprobs=list(sample.logprobs) if params.logprobs is not None else None,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )

    def _delta(self, request: Request, sample: Sample) -> CompletionOutput | None:
        """What is new in `sample` since its last delta; None if nothing (or already final)."""
        seq, params = sample.seq, request.params
        if sample.sent_final:
            return None
        new_ids = seq.output_token_ids[sample.sent_tokens :]
        if not new_ids and not seq.is_finished:
            return None
        text = self._text(request, sample, final=seq.is_finished)
        new_text = text[sample.sent_chars :]
        new_logprobs = None
        if params.logprobs is not None:
            new_logprobs = sample.logprobs[sample.sent_tokens :]
        sample.sent_tokens = seq.num_output_tokens
        sample.sent_chars = len(text)
        sample.sent_final = seq.is_finished
        return CompletionOutput(
            index=sample.index,
            text=new_text,
            token_ids=list(new_ids),
            cumulative_logprob=sample.cumulative_logprob if params.logprobs is not None else None,
            logprobs=new_logprobs,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )

    def _text(self, request: Request, sample: Sample, *, final: bool) -> str:
        """The sample's text; before it finishes, only the part that cannot change any more."""
        params = request.params
        if not params.detokenize:
            return ""
        matcher = sample.stop_matcher
        if matcher is not None and matcher.matched is not None:
            return matcher.text
        text = self.tokenizer.decode(
            sample.seq.output_token_ids, skip_special_tokens=params.skip_special_tokens
        )
        if final:
            return text
        if params.stop and not params.include_stop_str_in_output:
            text = text[: max(0, len(text) - (max(map(len, params.stop)) - 1))]
        stable = text.rstrip(_INCOMPLETE)  # a partial UTF-8 character waits for its bytes
        return stable if len(stable) >= sample.sent_chars else text[: sample.sent_chars]

    def _prompt_logprobs(self, request: Request) -> list[dict[int, Logprob] | None] | None:
        """vLLM's shape: one entry per prompt token, None for the first (nothing predicts it);
        None until every position has been computed."""
        if request.params.prompt_logprobs is None:
            return None
        count = len(request.prompt_token_ids)
        if len(request.prompt_logprobs) < count - 1:
            return None
        return [None] + [request.prompt_logprobs[p] for p in range(1, count)]

    # ---- logprob entries ----------------------------------------------------------------------

    def _logprob_entry(
        self, token: int, logprob: float, rank: int, top_ids: np.ndarray, top_values: np.ndarray
    ) -> dict[int, Logprob]:
        """vLLM's per-position dict: the chosen token first, then the top ones ranked 1..k."""
        entry = {token: Logprob(logprob, rank, self._decode_one(token))}
        for top_rank, (tid, value) in enumerate(zip(top_ids, top_values, strict=True), 1):
            entry.setdefault(int(tid), Logprob(float(value), top_rank, self._decode_one(int(tid))))
        return entry

    def _top_count(self, requested: int | None) -> int | None:
        return self.vocab_size if requested == -1 else requested

    def _decode_one(self, token_id: int) -> str:
        """A token's own text (Logprob.decoded_token), cached: logprobs=-1 asks for every one."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text
