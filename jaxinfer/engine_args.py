"""vLLM's `LLM(...)` engine arguments: accepted at the values that change nothing here, refused
(naming the argument) at any value that would need behaviour jaxinfer lacks.

A script or evaluation harness written for vLLM passes these as a matter of course
(`trust_remote_code=False`, `quantization=None`, `enable_lora=False`, `max_num_seqs=None`, ...);
rejecting them would stop it at the first line, and silently ignoring a value that matters
(`trust_remote_code=True`, a LoRA switch) would run something other than what was asked.
"""

from __future__ import annotations

import dataclasses

from jaxinfer.config import EngineConfig

TASKS = ("auto", "generate", "embed")

# name -> the values accepted (they change nothing here), and why other values are refused.
_NEUTRAL: dict[str, tuple[tuple, str]] = {
    "trust_remote_code": (
        (False,),
        "no code from a checkpoint ever runs here; every supported architecture is built in",
    ),
    "code_revision": ((None,), "no code from a checkpoint ever runs here"),
    "tokenizer_mode": (("auto",), "the tokenizer is always the checkpoint's own (fast) one"),
    "enable_lora": ((False, None), "LoRA adapters are not supported"),
    "max_lora_rank": (None, ""),  # any value: sizes LoRA slots, and enable_lora=True is refused
    "skip_tokenizer_init": ((False,), "the engine needs its tokenizer"),
    "disable_custom_all_reduce": ((False, True), ""),
    "enforce_eager": ((False, True), ""),  # nothing is eager here: steps are compiled ahead
    "swap_space": (None, ""),  # any value: there is no CPU swap of KV blocks to size
    "cpu_offload_gb": ((0, 0.0), "weight offloading is not supported"),
    "disable_log_stats": ((False, True), ""),
    "load_format": (("auto", "safetensors", "gguf"), "weights load from safetensors or GGUF"),
    # huggingface_hub sends the token of $HF_TOKEN or `hf auth login` by itself (True: that one).
    # A token string is not taken: EngineConfig is recorded in evaluation results.
    "hf_token": (
        (None, True),
        (
            "put the token in the environment (HF_TOKEN) or run `hf auth login`; huggingface_hub "
            "reads it from there, and a token kept in the engine config would be written into "
            "evaluation results"
        ),
    ),
    "max_seq_len_to_capture": (None, ""),  # CUDA graphs: not a concept here
    "calculate_kv_scales": (
        (False, None),
        "an fp8 KV cache uses scale 1.0 (vLLM's default); calibrated scales are not supported",
    ),
    "compilation_config": ((None,), "compilation is configured through the bucket fields"),
}


def engine_config(model: EngineConfig | str | None, engine_args: dict) -> tuple[EngineConfig, str]:
    """`LLM(...)`'s arguments -> (EngineConfig, task). EngineConfig fields pass through."""
    args = dict(engine_args)
    task = args.pop("task", "auto")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    for name, (accepted, why) in _NEUTRAL.items():
        if name not in args:
            continue
        value = args.pop(name)
        if accepted is not None and value not in accepted:
            shown = "<a token>" if name == "hf_token" else repr(value)  # never echo a secret
            raise ValueError(f"{name}={shown} is not supported: {why} (accepted: {accepted})")
    if args.get("enable_prefix_caching", False) is None:
        del args["enable_prefix_caching"]  # vLLM's None: the default (on)
    if "max_num_seqs" in args and args["max_num_seqs"] is None:
        del args["max_num_seqs"]  # vLLM's None: the default
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise TypeError(
            f"LLM() got unknown engine arguments {unknown}: pass EngineConfig fields or vLLM's "
            "engine arguments (see jaxinfer/engine_args.py)"
        )
    if isinstance(model, EngineConfig):
        return (model.replace(**args) if args else model), task
    if model is not None:
        args["model"] = model
    return EngineConfig(**args), task
