"""Request intake: every prompt of a call parsed, tokenized and validated before any is queued.

Pure host functions (numpy, no JAX) of the prompt, its SamplingParams, the tokenizer and the
engine's `IntakeLimits`, so that the engine can check a whole `generate()` call first and one bad
prompt leaves the engine, its scheduler and its KV cache untouched. Whatever a caller passes, the
only way out besides a result is a ValueError or TypeError whose message names the prompt's
index in the call (`prompts[3]`), the field, and the allowed range; never an IndexError or an
OverflowError from deep inside the engine, and never a request that could not run.

Prompts are what vLLM's `LLM.generate` takes (jaxinfer/inputs.py): a str, a `TextPrompt`
`{"prompt": str}`, a `TokensPrompt` `{"prompt_token_ids": [...]}` (optionally with the text as
"prompt"), or a bare list / 1-D numpy integer array of token ids; one of them or a list of them.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxinfer.inputs import TokensPrompt
from jaxinfer.sampling_params import INT32_MAX, SamplingParams

# vLLM prompt keys that ask for something a text-only decoder cannot do: rejected by name.
_UNSUPPORTED_KEYS = {
    "multi_modal_data": "multi-modal input",
    "mm_processor_kwargs": "multi-modal input",
    "multi_modal_uuids": "multi-modal input",
    "token_type_ids": "cross-encoder token type ids",
    "prompt_embeds": "prompts given as embeddings",
    "encoder_prompt": "encoder/decoder prompts",
    "decoder_prompt": "encoder/decoder prompts",
    "data": "IO-processor plugin prompts",
    "data_format": "IO-processor plugin prompts",
}
# vLLM's `cache_salt` keeps requests with different salts from sharing prefix-cache blocks. No KV
# block is ever shared between requests here, so the guarantee holds as it is: accepted, unused.
_IGNORED_KEYS = ("cache_salt",)
_PROMPT_FORMS = (
    "a str, a {'prompt': str} dict (TextPrompt), a {'prompt_token_ids': [...]} dict "
    "(TokensPrompt), or a list / 1-D numpy array of int token ids"
)


@dataclass(frozen=True, kw_only=True)
class IntakeLimits:
    """What validation needs from the engine, so that intake needs no engine.

    `num_usable_blocks` x `block_size` tokens is the most one sequence can ever hold: a request
    that needs more, alone in the cache, could never run (the scheduler would preempt forever).
    `eos_token_ids` lets intake reject a `min_tokens` that no allowed token could satisfy.
    """

    max_model_len: int
    vocab_size: int
    max_logprobs: int  # -1: no bound
    max_num_seqs: int
    block_size: int
    num_usable_blocks: int
    eos_token_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_seqs", "block_size", "num_usable_blocks"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(
                    f"IntakeLimits.{name} must be an int >= 1, got {getattr(self, name)!r}"
                )
        if not _is_int(self.vocab_size) or not 1 <= self.vocab_size <= INT32_MAX + 1:
            raise ValueError(
                "IntakeLimits.vocab_size must be in [1, 2**31] (ids are int32), got "
                f"{self.vocab_size!r}"
            )
        if not _is_int(self.max_logprobs) or self.max_logprobs < -1:
            raise ValueError(f"IntakeLimits.max_logprobs must be >= -1, got {self.max_logprobs!r}")
        object.__setattr__(self, "eos_token_ids", frozenset(int(t) for t in self.eos_token_ids))


@dataclass(frozen=True, kw_only=True)
class PreparedRequest:
    """One prompt, tokenized (and truncated, if asked) and validated against the limits.

    `prompt` is the text when there is one (reported back in RequestOutput.prompt);
    `bad_words_token_ids` are the token sequences of `params.bad_words` (`bad_word_token_ids`).
    """

    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    grammar: str | None = None  # llguidance grammar of params.structured_outputs, validated


# ---- the whole call ---------------------------------------------------------------------------


def prepare_requests(
    prompts: Any,
    sampling_params: SamplingParams | Sequence[SamplingParams] | None,
    *,
    tokenizer: Any,
    limits: IntakeLimits,
    default_params: SamplingParams,
) -> list[PreparedRequest]:
    """`LLM.generate(prompts, sampling_params)`'s requests, every one encoded and validated.

    Raises (ValueError or TypeError naming `prompts[i]`) before returning anything, so the
    caller queues all of them or none.
    """
    prompt_list = as_prompt_list(prompts)
    params_list = params_for(len(prompt_list), sampling_params, default_params)
    return [
        prepare_request(prompt, params, i, tokenizer=tokenizer, limits=limits)
        for i, (prompt, params) in enumerate(zip(prompt_list, params_list, strict=True))
    ]


def as_prompt_list(prompts: Any) -> list:
    """One prompt or a list of them -> a list of prompts (each still unchecked).

    A flat list of numbers is one prompt of token ids (vLLM's rule), checked as such later, so
    `[1, 2.0]` fails as a float token id rather than as two odd prompts.
    """
    if prompts is None:
        raise TypeError(f"prompts is None: pass a prompt ({_PROMPT_FORMS}) or a list of them")
    if isinstance(prompts, str | dict):
        return [prompts]
    if isinstance(prompts, bytes | bytearray | memoryview):
        raise TypeError(
            "prompts is bytes: decode it to str first (bytes would otherwise be read as token ids)"
        )
    if isinstance(prompts, set | frozenset):
        raise TypeError("prompts is a set: its order is arbitrary, pass a list so outputs match")
    if isinstance(prompts, np.ndarray):
        if prompts.ndim == 1:
            return [prompts]
        if prompts.ndim == 2:
            return list(prompts)
        raise TypeError(
            f"prompts as a numpy array must be 1-D (one prompt) or 2-D (one per row), got "
            f"shape {prompts.shape}"
        )
    if not isinstance(prompts, Iterable):
        raise TypeError(
            f"prompts must be a prompt ({_PROMPT_FORMS}) or a list of them, got "
            f"{type(prompts).__name__}"
        )
    items = list(prompts)
    if not items:
        raise ValueError("prompts is empty: pass a str, a list of str, or token-id lists")
    if all(isinstance(item, numbers.Number) for item in items):
        return [items]  # one prompt given as token ids
    return items


def params_for(
    num_prompts: int,
    sampling_params: SamplingParams | Sequence[SamplingParams] | None,
    default: SamplingParams,
) -> list[SamplingParams]:
    """One SamplingParams per prompt: the default, one shared by all, or one each (vLLM)."""
    if sampling_params is None:
        return [default] * num_prompts
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * num_prompts
    if isinstance(sampling_params, str | bytes | dict) or not isinstance(sampling_params, Iterable):
        raise TypeError(
            "sampling_params must be None, a SamplingParams, or a list of them (one per prompt), "
            f"got {type(sampling_params).__name__}"
        )
    params = list(sampling_params)
    if len(params) != num_prompts:
        raise ValueError(
            f"sampling_params has {len(params)} entries for {num_prompts} prompts; "
            "pass one SamplingParams or one per prompt"
        )
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise TypeError(f"sampling_params[{i}] must be SamplingParams, got {type(p).__name__}")
    return params


# ---- one request ------------------------------------------------------------------------------


def prepare_request(
    prompt: Any, params: SamplingParams, index: int, *, tokenizer: Any, limits: IntakeLimits
) -> PreparedRequest:
    """One prompt (`prompts[index]` in messages) encoded and validated; `add_request` uses it."""
    where = f"prompts[{index}]"
    if not isinstance(params, SamplingParams):
        raise TypeError(
            f"{where}: sampling params must be SamplingParams, got {type(params).__name__}"
        )
    text, token_ids = encode_prompt(prompt, index, tokenizer)
    if params.truncate_prompt_tokens is not None:
        # vLLM's left truncation; -1: the longest prompt that leaves room for one new token.
        keep = params.truncate_prompt_tokens
        keep = limits.max_model_len - 1 if keep == -1 else keep
        token_ids = token_ids[max(0, len(token_ids) - keep) :]
    _check_prompt_tokens(token_ids, where, limits)
    try:
        params.validate_for_model(limits.vocab_size, limits.max_logprobs)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error
    if params.n > limits.max_num_seqs:
        raise ValueError(
            f"{where}: SamplingParams.n={params.n} exceeds max_num_seqs={limits.max_num_seqs} "
            "(a request's n samples run side by side); it must be in [1, max_num_seqs]"
        )
    bad_words = bad_word_token_ids(tokenizer, params.bad_words or [], index)
    _check_bad_word_ids(bad_words, params, where, limits)
    _check_some_token_allowed(bad_words, params, where, limits)
    _check_fits_kv_cache(len(token_ids), params, where, limits)
    grammar = None
    if params.structured_outputs is not None:
        from jaxinfer.engine.structured_output import compile_grammar  # llguidance: on first use

        grammar = compile_grammar(params.structured_outputs, where)
    return PreparedRequest(
        prompt=text,
        prompt_token_ids=token_ids,
        params=params,
        bad_words_token_ids=bad_words,
        grammar=grammar,
    )


def encode_prompts(prompts: Any, tokenizer: Any) -> list[tuple[str | None, list[int]]]:
    """(text, token ids) for each prompt, types checked but no limits (the encoder engine's
    embedder checks lengths itself)."""
    return [encode_prompt(prompt, i, tokenizer) for i, prompt in enumerate(as_prompt_list(prompts))]


def encode_prompt(prompt: Any, index: int, tokenizer: Any) -> tuple[str | None, list[int]]:
    """-> (text or None, token ids as Python ints) of `prompts[index]`; no range checks yet."""
    where = f"prompts[{index}]"
    if isinstance(prompt, str):
        return prompt, _tokenize(tokenizer, prompt, where)
    if isinstance(prompt, dict):
        return _encode_dict(prompt, where, tokenizer)
    if isinstance(prompt, list | tuple | np.ndarray):
        return None, _token_id_list(prompt, where)
    if isinstance(prompt, bytes | bytearray | memoryview):
        raise TypeError(f"{where} is bytes: decode it to str first, or pass token ids as a list")
    raise TypeError(f"{where} must be {_PROMPT_FORMS}; got {type(prompt).__name__}")


def bad_word_token_ids(
    tokenizer: Any, bad_words: Sequence[str], index: int
) -> tuple[tuple[int, ...], ...]:
    """vLLM's rule (SamplingParams.update_from_tokenizer): each word, leading whitespace
    stripped, encoded alone and, when that gives other tokens of the same count, after a space.

    A word that encodes to no tokens (whitespace only, like " " or "\\n") is rejected, as vLLM
    rejects it: there would be nothing to ban, and silently ignoring it hides the mistake.
    """
    sequences: list[tuple[int, ...]] = []
    for j, word in enumerate(bad_words):
        where = f"prompts[{index}]: SamplingParams.bad_words[{j}]"
        plain = tuple(_tokenize(tokenizer, word.lstrip(), where, special=False))
        if not plain:
            raise ValueError(
                f"{where}={word!r} encodes to no tokens once its leading whitespace is stripped "
                "(vLLM's rule); a bad word must contain a non-whitespace character"
            )
        spaced = tuple(_tokenize(tokenizer, " " + word.lstrip(), where, special=False))
        sequences.append(plain)
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            sequences.append(spaced)
    return tuple(sequences)


def render_chats(
    tokenizer: Any,
    messages: list[dict] | list[list[dict]],
    *,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template_kwargs: dict | None = None,
) -> list[TokensPrompt]:
    """`LLM.chat`'s prompts: each conversation through the chat template, as a TokensPrompt with
    the rendered text. The ids are exactly `apply_chat_template(..., tokenize=True)` (the template
    places the special tokens itself), so they are not tokenized again."""
    conversations = _as_conversations(messages)
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            "the tokenizer has no chat template: pass chat_template= (a Jinja template "
            "string), or use generate() with plain prompts"
        )
    options = {
        "chat_template": template,
        "add_generation_prompt": add_generation_prompt,
        "continue_final_message": continue_final_message,
        **(chat_template_kwargs or {}),
    }
    prompts: list[TokensPrompt] = []
    for conversation in conversations:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, **options)
        ids = tokenizer.apply_chat_template(
            conversation, tokenize=True, return_dict=False, **options
        )
        prompts.append({"prompt": text, "prompt_token_ids": list(ids)})
    return prompts


# ---- helpers ----------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    """An int token id: Python or numpy integer, not a bool (`True` is an int in Python)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def _encode_dict(prompt: dict, where: str, tokenizer: Any) -> tuple[str | None, list[int]]:
    """vLLM's TextPrompt / TokensPrompt; any other key is refused by name."""
    for key, value in prompt.items():
        if key in ("prompt", "prompt_token_ids"):
            continue
        if key in _UNSUPPORTED_KEYS:
            raise ValueError(
                f"{where}: {key!r} is not supported: jaxinfer runs text-only models "
                f"({_UNSUPPORTED_KEYS[key]} is not available)"
            )
        if key in _IGNORED_KEYS:
            if not isinstance(value, str):
                raise TypeError(f"{where}[{key!r}] must be a str, got {type(value).__name__}")
            continue
        raise ValueError(
            f"{where}: unknown key {key!r}; a prompt dict takes 'prompt' (text, vLLM's "
            "TextPrompt) and/or 'prompt_token_ids' (token ids, vLLM's TokensPrompt)"
        )
    text = prompt.get("prompt")
    if "prompt" in prompt and not isinstance(text, str):
        raise TypeError(f"{where}['prompt'] must be a str, got {type(text).__name__}")
    if "prompt_token_ids" in prompt:
        return text, _token_id_list(prompt["prompt_token_ids"], f"{where}['prompt_token_ids']")
    if text is None:
        raise ValueError(f"{where}: a prompt dict needs 'prompt' or 'prompt_token_ids'")
    return text, _tokenize(tokenizer, text, where)


def _token_id_list(value: object, where: str) -> list[int]:
    """Token ids given by the caller -> a fresh list of Python ints (range checked later)."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or not np.issubdtype(value.dtype, np.integer):
            raise TypeError(
                f"{where} must be a 1-D integer array of token ids, got a {value.dtype} array of "
                f"shape {value.shape}"
            )
        return [int(t) for t in value.tolist()]
    if not isinstance(value, list | tuple):
        raise TypeError(
            f"{where} must be a list of int token ids, got {type(value).__name__} {value!r:.40}"
        )
    for j, token in enumerate(value):
        if not _is_int(token):
            raise TypeError(
                f"{where}[{j}] must be an int token id, got {type(token).__name__} {token!r:.40}"
            )
    return [int(t) for t in value]


def _tokenize(tokenizer: Any, text: str, where: str, special: bool = True) -> list[int]:
    """`tokenizer.encode(text)`; whatever the tokenizer raises (e.g. on a lone surrogate) comes
    back as a ValueError naming the prompt."""
    try:
        ids = (
            tokenizer.encode(text) if special else tokenizer.encode(text, add_special_tokens=False)
        )
    except Exception as error:  # any tokenizer failure is the caller's bad input
        raise ValueError(
            f"{where}: the tokenizer cannot encode {text!r:.60} ({type(error).__name__}: {error})"
        ) from error
    return [int(t) for t in ids]


def _check_prompt_tokens(token_ids: list[int], where: str, limits: IntakeLimits) -> None:
    if not token_ids:
        raise ValueError(f"{where} is empty: at least one token is needed")
    if len(token_ids) >= limits.max_model_len:
        raise ValueError(
            f"{where} has {len(token_ids)} tokens; it must be shorter than max_model_len="
            f"{limits.max_model_len} to leave room for a generated token (or set "
            "SamplingParams.truncate_prompt_tokens)"
        )
    vocab = limits.vocab_size
    bad = [(j, t) for j, t in enumerate(token_ids) if not 0 <= t < vocab]
    if bad:
        shown = ", ".join(f"[{j}]={t}" for j, t in bad[:5])
        raise ValueError(f"{where}: token ids must be in [0, vocab_size={vocab}); got {shown}")


def _check_bad_word_ids(
    bad_words: tuple[tuple[int, ...], ...], params: SamplingParams, where: str, limits: IntakeLimits
) -> None:
    """The tokenizer may know more tokens than the model has logits for (vLLM checks this too)."""
    out_of_vocab = sorted({t for ids in bad_words for t in ids if not 0 <= t < limits.vocab_size})
    if out_of_vocab:
        raise ValueError(
            f"{where}: SamplingParams.bad_words {params.bad_words} encode to token ids "
            f"{out_of_vocab[:5]} outside the model's vocabulary [0, {limits.vocab_size})"
        )


def _check_some_token_allowed(
    bad_words: tuple[tuple[int, ...], ...], params: SamplingParams, where: str, limits: IntakeLimits
) -> None:
    """A request whose every allowed token is banned could only emit a token it forbids."""
    if params.allowed_token_ids is None:
        return
    allowed = set(params.allowed_token_ids) - {ids[0] for ids in bad_words if len(ids) == 1}
    if not allowed:
        raise ValueError(
            f"{where}: every token of SamplingParams.allowed_token_ids "
            f"{params.allowed_token_ids[:8]} is a bad word (bad_words {params.bad_words}), so no "
            "token could be generated"
        )
    stops = set(params.stop_token_ids or []) | limits.eos_token_ids
    if params.min_tokens > 0 and allowed <= stops:
        raise ValueError(
            f"{where}: SamplingParams.min_tokens={params.min_tokens} can never be met: every "
            f"allowed token {sorted(allowed)[:8]} is eos or a stop_token_id, which min_tokens bans"
        )


def _check_fits_kv_cache(
    num_prompt_tokens: int, params: SamplingParams, where: str, limits: IntakeLimits
) -> None:
    """Alone in the cache, the request must fit its longest possible life (the scheduler's
    rule), or preempting everyone else would still not make room and the engine would spin."""
    room = limits.max_model_len - num_prompt_tokens
    max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
    total = num_prompt_tokens + max_tokens
    needed = -(-total // limits.block_size)
    if needed > limits.num_usable_blocks:
        capacity = limits.num_usable_blocks * limits.block_size
        fix = (
            f"max_tokens <= {capacity - num_prompt_tokens}"
            if capacity > num_prompt_tokens
            else "a prompt shorter than the whole cache"
        )
        raise ValueError(
            f"{where} can never fit in the KV cache: {num_prompt_tokens} prompt tokens + "
            f"{max_tokens} to generate (max_tokens, capped at max_model_len="
            f"{limits.max_model_len}) = {total} tokens need {needed} blocks of "
            f"{limits.block_size}, but the cache has {limits.num_usable_blocks} "
            f"({capacity} tokens); it needs {fix}"
        )


def _as_conversations(messages: Any) -> list[list[dict]]:
    """One conversation (a list of {"role", "content"} dicts) or a list of them."""
    if not isinstance(messages, list | tuple) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    conversations = [messages] if isinstance(messages[0], dict) else list(messages)
    for i, conversation in enumerate(conversations):
        if (
            not isinstance(conversation, list | tuple)
            or not conversation
            or not all(isinstance(m, dict) and "role" in m and "content" in m for m in conversation)
        ):
            raise ValueError(
                f"messages[{i}] must be a non-empty list of {{'role', 'content'}} dicts"
            )
    return conversations
