"""`vllm` resolved to jaxinfer, for tests/test_lm_eval_harness.py only (it puts this folder's
parent on sys.path while lm-evaluation-harness's `vllm` backend loads, then takes it off).

This package holds only the names lm-eval's `lm_eval/models/vllm_causallms.py` imports, each
bound to jaxinfer's own object; everything that backend calls on them is jaxinfer's real API.
The sibling `vllm-0.8.2+jaxinfer.dist-info` answers lm-eval's `importlib.metadata.version("vllm")`
checks: below 0.8.3 lm-eval takes the chat template from the tokenizer itself (what
`LLM.chat` does here) instead of importing vLLM's `resolve_hf_chat_template`, which jaxinfer
has no counterpart for.
"""

from jaxinfer import LLM, SamplingParams, TokensPrompt

__all__ = ["LLM", "SamplingParams", "TokensPrompt"]
