"""Structured outputs on the host: grammars compiled once per constraint, one llguidance matcher
per sample, and each step's packed token bitmask.

Why llguidance: it compiles JSON schemas, regexes and Lark/GBNF grammars against the tokenizer and
computes a next-token mask in tens of microseconds, with no dependencies. The mask it fills is
packed, 32 tokens per int32 word (bit t % 32 of word t // 32 set = token t allowed); the step takes
it as an input `[S, ceil(V/32)]` and unpacks it on the device (runtime/step.py), so a new schema
never compiles a new program.

The matcher's state is a function of the sample's output tokens only: `GrammarMatcher.sync` brings
it to whatever the output is now (consuming new tokens, or rolling back after a preemption
rewrote it), so the engine never has to keep the two in step by hand.
"""

from __future__ import annotations

import functools
import json

import llguidance
import llguidance.hf
import llguidance.numpy
import numpy as np

from jaxinfer.structured_outputs import StructuredOutputsParams

MASK_BITS = 32  # tokens per int32 word of the packed bitmask
_ANY_JSON_OBJECT = '{"type": "object"}'


def mask_words(vocab_size: int) -> int:
    return -(-vocab_size // MASK_BITS)


@functools.lru_cache(maxsize=512)
def _grammar(kind: str, spec: str) -> tuple[str, str]:
    """(llguidance grammar text, "" or the error): cached, so a schema is compiled once."""
    if kind == "json":
        grammar = llguidance.LLMatcher.grammar_from_json_schema(spec)
    elif kind == "json_object":
        grammar = llguidance.LLMatcher.grammar_from_json_schema(_ANY_JSON_OBJECT)
    elif kind == "regex":
        grammar = llguidance.LLMatcher.grammar_from_regex(spec)
    elif kind == "choice":
        grammar = llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(choice) for choice in json.loads(spec))
        )
    else:  # "grammar": Lark, or GBNF converted to Lark
        try:
            grammar = llguidance.grammar_from("grammar", spec)
        except ValueError as error:
            return "", str(error)
    return grammar, llguidance.LLMatcher.validate_grammar(grammar)


def compile_grammar(params: StructuredOutputsParams, where: str) -> str:
    """The llguidance grammar for `params`; a ValueError naming `where` and the field if the
    schema, regex or grammar is invalid (raised at intake, before anything is queued)."""
    kind = params.kind
    try:
        grammar, error = _grammar(kind, params.spec)
    except ValueError as exc:  # a json text that is not JSON
        grammar, error = "", str(exc)
    if error:
        raise ValueError(f"{where}: SamplingParams.structured_outputs.{kind} is invalid: {error}")
    return grammar


class GrammarMatcher:
    """One sample's matcher, kept equal to its output tokens by `sync`."""

    def __init__(self, template: llguidance.LLMatcher) -> None:
        self._template = template  # the compiled grammar's initial state, shared
        self._matcher = template.deep_copy()
        self._consumed: list[int] = []

    def sync(self, output_token_ids) -> None:
        """Make the matcher's state that after `output_token_ids` (consume what is new, roll
        back what a preemption or a taken-back token removed)."""
        target = list(output_token_ids)
        common = 0
        limit = min(len(target), len(self._consumed))
        while common < limit and target[common] == self._consumed[common]:
            common += 1
        if common < len(self._consumed):
            # An error state is final in llguidance (a refused token): start again from a copy.
            if self._matcher.is_error() or not self._matcher.rollback(len(self._consumed) - common):
                self._matcher = self._template.deep_copy()
                self._matcher.consume_tokens(target[:common])
            del self._consumed[common:]
        for token in target[common:]:
            self._matcher.consume_token(token)  # a refused token leaves it in its error state
            self._consumed.append(token)

    def fill(self, output_token_ids, out: np.ndarray, row: int) -> None:
        """Write the packed mask of the next token after `output_token_ids` into out[row]."""
        self.sync(output_token_ids)
        llguidance.numpy.fill_next_token_bitmask(self._matcher, out, row)

    @property
    def is_stopped(self) -> bool:
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error()


class StructuredOutputs:
    """The engine's llguidance tokenizer (built on first use: ~1 s) and one compiled matcher per
    grammar, copied (cheap) for each sample that uses it."""

    def __init__(self, tokenizer, eos_token_ids, vocab_size: int, max_cached: int = 256) -> None:
        self._hf_tokenizer = tokenizer
        self._eos = sorted(eos_token_ids)
        self.vocab_size = vocab_size
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: dict[str, llguidance.LLMatcher] = {}
        self._max_cached = max_cached

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        if self._ll_tokenizer is None:
            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos or None
            )
        return self._ll_tokenizer

    def check(self, grammar: str, kind: str, where: str) -> None:
        """What `compile_grammar` cannot see without the tokenizer (a token id past the
        vocabulary, a special token it lacks) -> the same ValueError, so a caller that checks
        before queuing refuses it rather than failing in `matcher` at add time. The compiled
        grammar is kept for `matcher`: each grammar is compiled once."""
        try:
            _ = self.ll_tokenizer  # built first, so that its own failure is named
        except ValueError as error:  # e.g. a word-level tokenizer llguidance cannot decode
            raise ValueError(
                f"{where}: SamplingParams.structured_outputs needs a tokenizer llguidance can "
                f"read (byte-level BPE or SentencePiece); this model's: {error}"
            ) from error
        try:
            self._template(grammar)
        except ValueError as error:
            raise ValueError(
                f"{where}: SamplingParams.structured_outputs.{kind} is invalid: {error}"
            ) from error

    def matcher(self, grammar: str) -> GrammarMatcher:
        try:
            return GrammarMatcher(self._template(grammar))
        except ValueError as error:
            raise ValueError(f"structured_outputs: {error}") from error

    def _template(self, grammar: str) -> llguidance.LLMatcher:
        """The grammar compiled against the tokenizer (cached, oldest evicted first)."""
        template = self._compiled.get(grammar)
        if template is None:
            template = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
            if template.is_error():
                raise ValueError(template.get_error())
            if len(self._compiled) >= self._max_cached:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[grammar] = template
        return template

    def allocate(self, num_rows: int) -> np.ndarray:
        """[num_rows, ceil(V/32)] int32, all ones: every token allowed."""
        return np.full((num_rows, mask_words(self.vocab_size)), -1, np.int32)
