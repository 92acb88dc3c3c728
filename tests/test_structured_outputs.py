"""Structured outputs (vLLM's `StructuredOutputsParams`, llguidance): the mechanics on a tiny
random checkpoint, whose outputs are nonsense unless the grammar holds them to the constraint.

Every generated text is checked against the constraint with a tool that is not llguidance:
`jsonschema` for schemas, Python's `re.fullmatch` for regexes, list membership for choices.
"""

from __future__ import annotations

import dataclasses
import json
import re

import jsonschema
import numpy as np
import pytest

from jaxinfer import (
    LLM,
    EngineConfig,
    GuidedDecodingParams,
    SamplingParams,
    StructuredOutputsParams,
)
from tests.checkpoints import tiny_checkpoint

CONFIG = {
    "dtype": "float32",
    "max_model_len": 128,
    "block_size": 8,
    "num_kv_blocks": 64,
    "max_num_seqs": 8,
    "max_num_batched_tokens": 64,
    "seq_buckets": (8,),
    "token_buckets": (64,),
}
# Compact JSON ("x-guidance": no free whitespace): a random model would otherwise spend its
# tokens on whitespace and hit max_tokens before the object closes.
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99},
        "tag": {"enum": ["red", "green"]},
        "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
    },
    "required": ["id", "tag", "flags"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},
}
REGEX = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
CHOICES = ["yes", "no", "maybe later"]
PROMPTS = ["Hello there", "Once upon a time", "The answer is", "Q: 2+2?"]


def valid(kind: str, text: str) -> bool:
    if kind == "json":
        try:
            jsonschema.validate(json.loads(text), {k: v for k, v in SCHEMA.items() if k[0] != "x"})
        except (json.JSONDecodeError, jsonschema.ValidationError):
            return False
        return True
    if kind == "regex":
        return re.fullmatch(REGEX, text) is not None
    return text in CHOICES


CONSTRAINTS = {
    "json": StructuredOutputsParams(json=SCHEMA),
    "regex": StructuredOutputsParams(regex=REGEX),
    "choice": StructuredOutputsParams(choice=CHOICES),
}


@pytest.fixture(scope="module")
def llm():
    engine = LLM(EngineConfig(model=str(tiny_checkpoint("llama")), **CONFIG))
    yield engine
    engine.shutdown()


def params(kind: str, **overrides) -> SamplingParams:
    options = {"temperature": 1.0, "seed": 11, "max_tokens": 48}
    return SamplingParams(**(options | {"structured_outputs": CONSTRAINTS[kind]} | overrides))


# ---- the parameters ----------------------------------------------------------------------------


def test_params_need_exactly_one_kind_of_the_right_type():
    with pytest.raises(ValueError, match="exactly one of .* got json, regex"):
        StructuredOutputsParams(json=SCHEMA, regex=REGEX)
    with pytest.raises(ValueError, match="got none"):
        StructuredOutputsParams()
    with pytest.raises(TypeError, match="choice must be a non-empty list of str"):
        StructuredOutputsParams(choice="yes")
    with pytest.raises(TypeError, match="regex must be a str"):
        StructuredOutputsParams(regex=3)
    with pytest.raises(TypeError, match="structured_outputs must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs="json")
    with pytest.raises(ValueError, match="backend"):
        GuidedDecodingParams(regex=REGEX, backend="xgrammar")


def test_guided_decoding_is_an_alias_and_params_round_trip():
    old = SamplingParams(guided_decoding=GuidedDecodingParams(choice=CHOICES, backend="guidance"))
    assert old.structured_outputs == StructuredOutputsParams(choice=CHOICES)
    assert old.guided_decoding is None
    assert old == SamplingParams(structured_outputs=StructuredOutputsParams(choice=CHOICES))
    again = SamplingParams(**dataclasses.asdict(old))  # a dict of its fields comes back as one
    assert again == old
    with pytest.raises(ValueError, match="differ"):
        SamplingParams(
            structured_outputs=StructuredOutputsParams(regex=REGEX),
            guided_decoding=GuidedDecodingParams(choice=CHOICES),
        )


# ---- generation --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["json", "regex", "choice"])
def test_every_sample_matches_its_constraint(llm, kind):
    outputs = llm.generate(PROMPTS, params(kind, n=3), use_tqdm=False)
    texts = [c.text for o in outputs for c in o.outputs]
    assert len(texts) == 12
    for o in outputs:
        for c in o.outputs:
            assert c.finish_reason == "stop", (c.text, c.finish_reason)
            assert valid(kind, c.text), c.text
    assert len(set(texts)) > 1  # sampled, not one forced answer


def test_an_unconstrained_model_does_not_match_them(llm):
    """The checks above could fail: without the grammar the same requests match nothing."""
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=1.0, seed=11, max_tokens=12))
    for kind in CONSTRAINTS:
        assert not any(valid(kind, o.outputs[0].text) for o in outputs)


def test_seeded_samples_repeat_alone_and_in_a_mixed_batch(llm):
    first = llm.generate(PROMPTS, params("json", n=2), use_tqdm=False)
    alone = llm.generate(PROMPTS[2], params("json", n=2), use_tqdm=False)[0]
    mixed = llm.generate(
        [PROMPTS[0], PROMPTS[2], PROMPTS[1]],
        [params("regex"), params("json", n=2), SamplingParams(temperature=0.7, seed=3)],
        use_tqdm=False,
    )
    tokens = [c.token_ids for c in first[2].outputs]
    assert [c.token_ids for c in alone.outputs] == tokens
    assert [c.token_ids for c in mixed[1].outputs] == tokens
    plain = llm.generate(PROMPTS[1], SamplingParams(temperature=0.7, seed=3), use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == plain[0].outputs[0].token_ids  # others unaffected


def test_guided_decoding_gives_the_same_tokens(llm):
    new = llm.generate(PROMPTS, params("regex"), use_tqdm=False)
    old = SamplingParams(
        temperature=1.0, seed=11, max_tokens=48, guided_decoding=GuidedDecodingParams(regex=REGEX)
    )
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, old, use_tqdm=False)] == [
        o.outputs[0].token_ids for o in new
    ]


def test_logprobs_are_the_constrained_distributions(llm):
    """vLLM masks the logits before the sampler, so a reported logprob is of the constrained
    distribution: where the grammar allows one token only (eos once it is complete) it is 0."""
    outputs = llm.generate(PROMPTS, params("choice", n=2, logprobs=3), use_tqdm=False)
    eos = llm.llm_engine.eos_token_ids
    for o in outputs:
        for c in o.outputs:
            assert c.token_ids[-1] in eos
            assert len(c.logprobs) == len(c.token_ids)
            last = c.logprobs[-1][c.token_ids[-1]]
            assert last.logprob == 0.0 and last.rank == 1
            # only the allowed token is finite: the other top entries are -inf
            assert all(v.logprob == -np.inf for t, v in c.logprobs[-1].items() if t not in eos)
            assert np.isclose(
                c.cumulative_logprob, sum(e[t].logprob for e, t in zip(c.logprobs, c.token_ids))
            )
            assert np.isfinite(c.cumulative_logprob)


def test_stop_strings_cut_a_constrained_output(llm):
    outputs = llm.generate(
        PROMPTS, params("choice", n=2, stop=[" "], max_tokens=16), use_tqdm=False
    )
    texts = {c.text for o in outputs for c in o.outputs}
    assert texts <= {"yes", "no", "maybe"}
    for o in outputs:
        for c in o.outputs:
            assert c.finish_reason == "stop"
            assert (c.stop_reason == " ") == (c.text == "maybe")


def test_invalid_schema_or_regex_fails_before_any_device_work(llm):
    core = llm.llm_engine
    steps, compiled = core.stats.num_steps, core.num_compilations
    bad = [
        (StructuredOutputsParams(regex="[0-9"), "regex"),
        (StructuredOutputsParams(json={"type": "objectx"}), "json"),
        (StructuredOutputsParams(json="{not json"), "json"),
        (StructuredOutputsParams(grammar="start: undefined_rule"), "grammar"),
        # Compiles without a tokenizer; only llguidance's view of this one refuses the token id.
        (StructuredOutputsParams(grammar="start: <[999999]>"), "grammar"),
    ]
    for constraint, field in bad:
        good = SamplingParams(max_tokens=4)
        with pytest.raises(
            ValueError, match=rf"prompts\[1\]: SamplingParams.structured_outputs.{field}"
        ):
            llm.generate(PROMPTS[:2], [good, SamplingParams(structured_outputs=constraint)])
    assert not core.has_unfinished_requests()
    assert core.stats.num_steps == steps and core.num_compilations == compiled


def test_preemption_rebuilds_the_grammar_from_the_outputs():
    """A cache too small for the batch preempts (recompute); the resumed samples' matchers are
    rebuilt from their output tokens, and the tokens equal those of an unsqueezed run."""
    path = tiny_checkpoint("llama")
    squeezed_config = CONFIG | {
        "num_kv_blocks": 17,
        "max_num_batched_tokens": 16,
        "token_buckets": (16,),
    }
    prompts = [
        {"prompt_token_ids": [(7 * i + 3 * q) % 500 + 2 for i in range(40)]} for q in range(4)
    ]
    request = params("json", n=2, max_tokens=60)
    squeezed = LLM(EngineConfig(model=str(path), **squeezed_config))
    roomy = LLM(EngineConfig(model=str(path), **CONFIG))
    try:
        tight = squeezed.generate(prompts, request, use_tqdm=False)
        assert squeezed.llm_engine.scheduler.num_preemptions > 0
        loose = roomy.generate(prompts, request, use_tqdm=False)
        for a, b in zip(tight, loose, strict=True):
            assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
            for c in a.outputs:
                assert c.finish_reason == "stop" and valid("json", c.text), c.text
        manager = squeezed.llm_engine.block_manager
        assert manager.num_free_blocks == manager.num_usable_blocks
    finally:
        squeezed.shutdown()
        roomy.shutdown()


def test_no_compilation_for_a_new_schema(llm):
    """The mask is a step input: after warm-up, new constraints compile nothing."""
    core = llm.llm_engine
    core.warmup()
    compiled = core.num_compilations
    schema = {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 3}
    for constraint in (
        StructuredOutputsParams(json=schema),
        StructuredOutputsParams(json_object=True),
    ):
        llm.generate(
            PROMPTS, SamplingParams(max_tokens=8, structured_outputs=constraint), use_tqdm=False
        )
    assert core.num_compilations == compiled


def test_a_matcher_follows_its_output_back_and_forth(llm):
    """`sync` rolls back what a preemption or a taken-back token removed: the mask after any
    history equals that of a fresh matcher fed the same tokens."""
    structured = llm.llm_engine.structured_outputs
    grammar = structured.matcher  # one compiled template, copied per sample
    tokenizer = llm.get_tokenizer()
    text_ids = tokenizer.encode('{"id":42,"tag":"red","flags":[true]}', add_special_tokens=False)
    from jaxinfer.engine.structured_output import compile_grammar

    compiled = compile_grammar(CONSTRAINTS["json"], "test")

    def mask_after(history, matcher=None):
        matcher = matcher or grammar(compiled)
        out = structured.allocate(1)
        matcher.fill(history, out, 0)
        return out[0].copy()

    moving = grammar(compiled)
    refused = text_ids[:3] + [text_ids[0]]  # '{"id' then '{': an error state
    for history in (text_ids[:9], text_ids[:3], refused, text_ids[:5], text_ids, []):
        assert (mask_after(history, moving) == mask_after(history)).all(), history
    assert (mask_after(text_ids[:3]) != mask_after(text_ids[:9])).any()
    complete = structured.allocate(1)
    moving.fill(text_ids, complete, 0)  # the object is closed: only eos remains
    eos = sorted(llm.llm_engine.eos_token_ids)
    allowed = [t for t in range(structured.vocab_size) if complete[0, t // 32] >> (t % 32) & 1]
    assert allowed == eos and moving.is_stopped


def test_a_tokenizer_llguidance_cannot_read_is_a_clear_error():
    """A word-level tokenizer (no byte fallback): llguidance cannot build its token table, and
    the request is refused naming the prompt and the field, not with llguidance's bare error."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from jaxinfer.engine.structured_output import StructuredOutputs

    vocab = {"<pad>": 0, "</s>": 1, "yes": 2, "no": 3}
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="</s>")
    outputs = StructuredOutputs(tokenizer, [1], len(vocab))
    with pytest.raises(ValueError, match=r"prompts\[3\]: SamplingParams.structured_outputs needs"):
        outputs.check("start: /yes|no/", "grammar", "prompts[3]")
