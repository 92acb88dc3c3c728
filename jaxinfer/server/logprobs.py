"""The engine's per-token logprob dicts -> OpenAI's two logprob formats (and vLLM's prompt ones).

The engine gives, per position, `{token_id: Logprob(logprob, rank, decoded_token)}`: the chosen
token first (whatever its rank), then the top-k alternatives by rank (jaxinfer/outputs.py).
- Completions (OpenAI's legacy format): parallel lists; `top_logprobs` holds the chosen token and
  the top k, so up to k + 1 entries, as OpenAI and vLLM return.
- Chat: one object per token with the `top_logprobs` most likely tokens, by rank.
Logprobs of -inf (a token the sampler could never pick) are sent as -9999.0, as vLLM does: JSON
has no infinity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jaxinfer.outputs import Logprob
from jaxinfer.server.responses import CompletionLogprobs, TokenLogprob, TopLogprob

Entry = dict[int, Logprob]
FLOOR = -9999.0


class TokenNamer:
    """A token's text for logprob lists: its own decoded text, or vLLM's `token_id:N` form
    (`return_tokens_as_token_ids`), which survives tokens that are not valid UTF-8 alone."""

    def __init__(self, tokenizer: Any, as_ids: bool) -> None:
        self.tokenizer = tokenizer
        self.as_ids = as_ids

    def __call__(self, token_id: int, logprob: Logprob | None = None) -> str:
        if self.as_ids:
            return f"token_id:{token_id}"
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.tokenizer.decode([token_id])


def completion_logprobs(
    token_ids: Sequence[int],
    entries: Sequence[Entry | None],
    name: TokenNamer,
    text_offset: int,
) -> tuple[CompletionLogprobs, int]:
    """-> (the logprobs of these tokens, the text offset after them). An entry of None (the
    first prompt token: nothing predicts it) gives null logprobs for that token."""
    out = CompletionLogprobs()
    for token, entry in zip(token_ids, entries, strict=True):
        chosen = entry.get(token) if entry else None
        text = name(token, chosen)
        out.tokens.append(text)
        out.text_offset.append(text_offset)
        text_offset += len(text)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_finite(chosen.logprob))
        out.top_logprobs.append({name(t, lp): _finite(lp.logprob) for t, lp in entry.items()})
    return out, text_offset


def chat_logprobs(
    token_ids: Sequence[int], entries: Sequence[Entry], name: TokenNamer, top: int
) -> list[TokenLogprob]:
    content = []
    for token, entry in zip(token_ids, entries, strict=True):
        chosen = entry[token]
        ranked = sorted(
            ((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top),
            key=lambda item: item[1].rank,
        )
        content.append(
            TokenLogprob(
                **_top(name(token, chosen), chosen.logprob),
                top_logprobs=[TopLogprob(**_top(name(t, lp), lp.logprob)) for t, lp in ranked],
            )
        )
    return content


def prompt_logprobs_json(entries: Sequence[Entry | None] | None) -> list | None:
    """vLLM's `prompt_logprobs`: per prompt token None or {token_id: {logprob, rank,
    decoded_token}}."""
    if entries is None:
        return None
    return [
        None
        if entry is None
        else {
            t: {"logprob": _finite(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
            for t, lp in entry.items()
        }
        for entry in entries
    ]


def _top(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode("utf-8"))}


def _finite(logprob: float) -> float:
    return max(logprob, FLOOR)
