"""/v1/embeddings through the `openai` client, on a server running all-MiniLM-L6-v2.

The server gets its own process (one model per server, as `vllm serve`), with small shapes and no
warm-up so it starts in seconds. Its vectors must equal `LLM.embed` on the same folder in this
process (the same compiled programs on the same batch, so to float32 rounding: atol 1e-6), in
both encodings: base64 (the client's default) and float lists.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest

from jaxinfer import LLM
from tests.server.conftest import Server, start_server

SHAPES = ["--max-model-len", "16", "--max-num-seqs", "2", "--max-num-batched-tokens", "32"]
TEXTS = ["A man is eating food.", "A man is eating a piece of bread."]


@pytest.fixture(scope="module")
def embedding_server(minilm_path: Path, tmp_path_factory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("embedding-server") / "server.log"
    running = start_server([str(minilm_path), *SHAPES, "--served-model-name", "minilm",
                            "--no-warmup", "--dtype", "float32"], log)  # fmt: skip
    yield running
    assert running.stop() == 0, running.output()


def test_embeddings_equal_llm_embed(embedding_server, minilm_path):
    client = openai.OpenAI(base_url=f"{embedding_server.url}/v1", api_key="none", max_retries=0)
    as_base64 = client.embeddings.create(model="minilm", input=TEXTS)  # the client's default
    as_floats = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    with LLM(str(minilm_path), max_model_len=16, max_num_seqs=2, max_num_batched_tokens=32,
             dtype="float32") as llm:  # fmt: skip
        expected = np.array([o.outputs.embedding for o in llm.embed(TEXTS, use_tqdm=False)])
        prompt_tokens = sum(len(llm.tokenizer.encode(t)) for t in TEXTS)
    for response in (as_base64, as_floats):
        assert [d.index for d in response.data] == [0, 1]
        got = np.array([d.embedding for d in response.data])
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
        assert response.usage.prompt_tokens == prompt_tokens
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, atol=1e-5)  # Normalize


def test_embedding_server_refuses_generation_and_long_inputs(embedding_server):
    client = openai.OpenAI(base_url=f"{embedding_server.url}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="embedding") as error:
        client.completions.create(model="minilm", prompt="hello")
    assert error.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError, match="max_model_len=16") as error:
        client.embeddings.create(model="minilm", input=["short", "word " * 40])
    assert error.value.body["param"] == "input"
    assert "input[1]" in error.value.body["message"]
