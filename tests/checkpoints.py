"""Tiny random Hugging Face checkpoints, built locally with `transformers` itself.

Tests compare jaxinfer against the reference implementation on checkpoints small enough to build in
well under a second: a byte-level BPE tokenizer trained here on a built-in corpus, and a random model
of each supported family saved with `save_pretrained`. Nothing is downloaded.

    path = tiny_checkpoint("qwen3", shards=2)      # built once per process, then cached
    ids = AutoTokenizer.from_pretrained(path)("Hello")["input_ids"]
    expected = hf_greedy(path, ids, max_new_tokens=8)

The weights are random but not degenerate: `initializer_range` is raised to 0.2 so greedy decoding
does not collapse onto one token, and norm weights and q/k/v biases (which transformers initializes
to ones and zeros) are perturbed, so a loader that drops them or a kernel that ignores them fails.
"""

from __future__ import annotations

import atexit
import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

# Llama-shaped families: the same config fields, and the `tiny_family` fixture runs over them.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# The other decoder families, each with its own config fields (`_shape_fields`); their parity
# tests are tests/models/test_families.py.
OTHER_FAMILIES = ("opt", "gpt2", "gemma", "gemma2", "phi3")

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, IM_START, IM_END)  # ids 0..4, in this order
VOCAB_SIZE = 512  # the trained size, special tokens included

# ChatML with a leading <|bos|>, like Llama 3 templates: apply_chat_template(tokenize=True) does not
# add special tokens, and text rendered with it should be encoded with add_special_tokens=False.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# GPT-4 style split, as in transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX.
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small language model reads the prompt one token at a
time, keeps keys and values in a paged cache, and writes the next token after the last one.
Once upon a time there was a little girl who lived in a village near the forest. Every morning she
walked to the river with her grandmother, and they talked about the birds, the trees and the weather.
The engine schedules many requests at once. Prefill fills the cache for a new prompt; decode extends
every running sequence by a single token. When the cache is full, the newest request is preempted and
its blocks go back to the free list, to be computed again later.
Numbers matter too: 0 1 2 3 4 5 6 7 8 9, 10, 42, 100, 2024, 3.14159, and 1e-6 are all tokens here.
def greedy(logits):\n    return int(logits.argmax())\n
<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>
"""

_WORDS_TEXT = (
    "the a an one two three some every this that model token cache block page queue request batch "
    "prompt answer story river forest village morning evening light dark quick slow small large new "
    "old red green blue read write keep send find make take give see run walk talk think learn "
    "and or but so because when while after before if then with without into over under between"
)


def _training_text() -> list[str]:
    """The built-in corpus plus seeded random sentences, so common merges are well covered."""
    rng = random.Random(0)
    words_pool = _WORDS_TEXT.split()
    lines = _CORPUS.splitlines()
    for _ in range(400):
        words = [rng.choice(words_pool) for _ in range(rng.randint(4, 14))]
        sentence = " ".join(words).capitalize() + rng.choice([".", "!", "?", ",", ";"])
        if rng.random() < 0.3:
            sentence += f" {rng.randint(0, 9999)}"
        lines.append(sentence)
    return lines


_TOKENIZER: PreTrainedTokenizerFast | None = None


def _tokenizer() -> PreTrainedTokenizerFast:
    """Trains the tokenizer once per process (training is deterministic, but once is cheaper)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        tok = Tokenizer(models.BPE())
        # Exactly what transformers' Qwen2Tokenizer rebuilds around the vocab and merges (AutoTokenizer
        # forces that class for model_type "qwen2"), so every family encodes text the same way.
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB_SIZE,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_training_text(), trainer=trainer)
        # Llama-style: one <|bos|> before every encoded text (add_special_tokens=True).
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A",
            pair=f"{BOS} $A {BOS} $B",
            special_tokens=[(BOS, tok.token_to_id(BOS))],
        )
        _TOKENIZER = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token=BOS,
            eos_token=EOS,
            pad_token=PAD,
            unk_token=None,
            additional_special_tokens=[IM_START, IM_END],
            chat_template=CHAT_TEMPLATE,
            model_max_length=512,
        )
    return _TOKENIZER


def build_tokenizer(folder: Path) -> None:
    """Saves the tiny byte-level BPE tokenizer (with chat template) into `folder`."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    _tokenizer().save_pretrained(folder)


def _rope_parameters(rope_scaling: str) -> dict[str, Any]:
    if rope_scaling == "default":
        return {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling == "llama3":
        return {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        }
    raise ValueError(f"rope_scaling must be 'default' or 'llama3', got {rope_scaling!r}")


def _shape_fields(family: str, num_kv_heads: int, rope_scaling: str) -> dict[str, Any]:
    """Each family's tiny shape (hidden 64, 2 layers, 4 heads of 16, MLP 128) in its config's own
    field names, with `initializer_range` (or OPT's `init_std`) raised to 0.2."""
    if family == "opt":
        return {
            "hidden_size": 64,
            "ffn_dim": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 512,
            "init_std": 0.2,
        }
    if family == "gpt2":
        return {
            "n_embd": 64,
            "n_inner": 128,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 512,
            "initializer_range": 0.2,
        }
    fields: dict[str, Any] = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": num_kv_heads,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "rope_parameters": _rope_parameters(rope_scaling),
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.2,
    }
    if family == "gemma2":
        # Small enough that the prompts outgrow the window, caps low enough to bind, and a query
        # scale that differs from head_dim**-0.5.
        fields.update(
            sliding_window=12,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
            query_pre_attn_scalar=24,
        )
    if family == "phi3":
        fields["original_max_position_embeddings"] = 512
    return fields


def _config(family: str, **fields: Any) -> PreTrainedConfig:
    if family == "opt":
        return OPTConfig(dropout=0.0, **fields)
    if family == "gpt2":
        return GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **fields)
    if family == "gemma":
        return GemmaConfig(**fields)
    if family == "gemma2":
        return Gemma2Config(**fields)
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return Phi3Config(**fields)
    if family == "llama":
        return LlamaConfig(**fields)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **fields)
    if family == "qwen2":  # q/k/v projections carry a bias
        return Qwen2Config(use_sliding_window=False, **fields)
    if family == "qwen3":  # RMSNorm on q and k per head
        return Qwen3Config(use_sliding_window=False, **fields)
    raise ValueError(f"family must be one of {FAMILIES + OTHER_FAMILIES}, got {family!r}")


@torch.no_grad()
def _perturb(model: PreTrainedModel, seed: int) -> None:
    """Norm weights start at 1 (Gemma's at 0) and biases at 0; move them so a loader that drops
    them shows."""
    gen = torch.Generator().manual_seed(seed + 1)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or (".ln_" in name and name.endswith(".weight")):
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
        elif name.endswith(".bias"):
            param.copy_(0.2 * torch.randn(param.shape, generator=gen))


def build_checkpoint(
    folder: Path,
    family: str = "llama",
    *,
    tie_word_embeddings: bool = False,
    num_kv_heads: int = 2,
    rope_scaling: str = "default",
    dtype: str = "float32",
    shards: int = 1,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Builds a random `family` checkpoint (config, safetensors, generation config, tokenizer)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer()
    fields: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        **_shape_fields(family, num_kv_heads, rope_scaling),
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    fields.update(config_overrides)
    config = _config(family, **fields)

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _perturb(model, seed)
    model = model.to(getattr(torch, dtype)).eval()

    # Shards are packed tensor by tensor, so `shards=2` may give 3 files; >1 always gives an index.
    total_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    max_shard_size: int | str = "50GB" if shards <= 1 else total_bytes // shards + 1
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if shards > 1 and not (folder / "model.safetensors.index.json").exists():
        raise RuntimeError(f"asked for {shards} shards but save_pretrained wrote a single file")
    return folder


# One engine shape for the SmolLM2 tests that need no shape of their own (test_smollm2,
# test_beam_search, test_gguf_native's float run): the KV cache and block tables are program
# inputs, so the same shape lets a later file's engine find the first one's programs in the
# persistent compilation cache (SmolLM2's 30 layers cost ~1.5 s of compile per program).
SMOLLM2_ENGINE = {"max_model_len": 512, "num_kv_blocks": 200, "max_num_seqs": 16}


_ROOT: Path | None = None
_CACHE: dict[str, Path] = {}


def tiny_checkpoint(family: str = "llama", **kw: Any) -> Path:
    """`build_checkpoint(family, **kw)` into a per-process temp folder, built once per argument set.

    Treat the folder as read-only: other tests get the same one.
    """
    global _ROOT
    key = json.dumps({"family": family, **kw}, sort_keys=True, default=str)
    if key not in _CACHE:
        if _ROOT is None:
            _ROOT = Path(tempfile.mkdtemp(prefix="jaxinfer-tiny-ckpt-"))
            atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
        folder = _ROOT / f"{family}-{len(_CACHE)}"
        _CACHE[key] = build_checkpoint(folder, family, **kw)
    return _CACHE[key]


def hf_model(path: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The reference model, loaded offline from `path`, in eval mode."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()


def _as_model(path_or_model: Path | str | PreTrainedModel) -> PreTrainedModel:
    if isinstance(path_or_model, PreTrainedModel):
        return path_or_model
    return hf_model(Path(path_or_model))


def hf_greedy(
    path_or_model: Path | str | PreTrainedModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    **generation: Any,
) -> list[int]:
    """Greedy continuation of one prompt by transformers, exactly `max_new_tokens` new token ids.

    EOS does not stop it and is not suppressed (matching jaxinfer's `ignore_eos=True`).
    `generation` adds GenerationConfig fields (e.g. `repetition_penalty`).
    """
    return hf_greedy_batch(_as_model(path_or_model), [prompt_ids], max_new_tokens, **generation)[0]


@torch.no_grad()
def hf_greedy_batch(
    model: PreTrainedModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    **generation: Any,
) -> list[list[int]]:
    """`hf_greedy` of many prompts in one `generate()` call, left-padded with an attention mask
    (transformers' own batched-generation path: positions come from the mask, padded keys get no
    weight; one prompt is not padded at all). Why: one prompt at a time costs a whole step per
    token per prompt; on SmolLM2 sixteen prompts of 64 tokens took 51 s one by one and 7 s
    batched, with the same tokens for all 16. Only the summation order can differ from one prompt
    alone (batch-shaped matmuls), the size of float32 rounding, which the engine's own greedy
    tokens must already be robust to.
    """
    longest = max(len(p) for p in prompts)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (longest - len(p)) + list(p) for p in prompts])
    attention_mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    # generate() fills every None in the config it is given from model.generation_config, so
    # eos_token_id=None alone would still stop at EOS: swap in a config without one for this call.
    generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad, **generation
    )
    saved, model.generation_config = model.generation_config, GenerationConfig()
    try:
        out = model.generate(
            input_ids, attention_mask=attention_mask, generation_config=generation_config
        )
    finally:
        model.generation_config = saved
    new_ids = [row[longest:].tolist() for row in out]
    if any(len(ids) != max_new_tokens for ids in new_ids):
        raise RuntimeError(f"generate made fewer than {max_new_tokens} tokens for a prompt")
    return new_ids


@torch.no_grad()
def hf_prefill_logits(
    path_or_model: Path | str | PreTrainedModel, prompt_ids: list[int]
) -> np.ndarray:
    """Logits of one prompt alone, float32. # [len(prompt_ids), vocab]"""
    model = _as_model(path_or_model)
    input_ids = torch.tensor([prompt_ids], dtype=torch.long)
    logits = model(input_ids, attention_mask=torch.ones_like(input_ids)).logits
    return logits[0].float().numpy()
