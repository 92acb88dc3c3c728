"""vLLM's prompt schemas (`vllm/inputs/data.py`), so code that builds vLLM prompts runs unchanged.

Only the text-only parts exist here. vLLM's other keys (`multi_modal_data`, `mm_processor_kwargs`,
`token_type_ids`, `prompt_embeds`, encoder/decoder prompts, ...) are rejected by name when a prompt
is taken in (jaxinfer/engine/intake.py), rather than silently dropped.
"""

from __future__ import annotations

import numpy as np
from typing_extensions import NotRequired, TypedDict


class TextPrompt(TypedDict):
    """A prompt given as text; the engine tokenizes it (with the tokenizer's special tokens)."""

    prompt: str


class TokensPrompt(TypedDict):
    """A prompt given as token ids, used as they are (no special tokens are added).

    `prompt`, as in vLLM, is the text those ids came from, when known: it is reported back in
    `RequestOutput.prompt` and never tokenized.
    """

    prompt_token_ids: list[int]
    prompt: NotRequired[str]


# What one prompt may be: vLLM's SingletonPrompt, plus vLLM's older bare token-id list (a 1-D
# numpy integer array counts as one).
PromptType = str | TextPrompt | TokensPrompt | list[int] | np.ndarray

__all__ = ["PromptType", "TextPrompt", "TokensPrompt"]
