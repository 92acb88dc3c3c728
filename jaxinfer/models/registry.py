"""Hugging Face `architectures` name -> the module that implements that family."""

from __future__ import annotations

from types import ModuleType

from jaxinfer.models import bert, gemma, gpt2, llama, opt, phi3

_FAMILIES: dict[str, ModuleType] = {
    name: family for family in (llama, gemma, gpt2, opt, phi3) for name in family.ARCHITECTURES
}
_FAMILIES.update({name: bert for name in bert.ARCHITECTURES})  # encoders: Engine.encode()


def supported_architectures() -> tuple[str, ...]:
    return tuple(sorted(_FAMILIES))


# GGUF-derived configs name a model_type but often no architectures.
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "bert": "BertModel",
}


def architectures_of(hf_config) -> list[str]:
    architectures = list(getattr(hf_config, "architectures", None) or [])
    if not architectures and getattr(hf_config, "model_type", None) in _MODEL_TYPES:
        architectures = [_MODEL_TYPES[hf_config.model_type]]
    return architectures


def model_family(hf_config) -> ModuleType:
    architectures = architectures_of(hf_config)
    for name in architectures:
        if name in _FAMILIES:
            return _FAMILIES[name]
    raise ValueError(
        f"unsupported model architecture {architectures or '(none in config.json)'}; "
        f"supported: {', '.join(supported_architectures())}"
    )
