"""EncoderEngine: `encode()` for encoder (BERT) models, which need no KV cache or sampler.

An encoder runs every prompt once, so there is no scheduler and no step loop: the Embedder
(host) batches prompts into buckets, pools and normalizes; the EncoderRunner it is given (device)
runs one compiled call per bucket.
"""

from __future__ import annotations

from jaxinfer.config import EngineConfig
from jaxinfer.engine import intake
from jaxinfer.engine.embedding import Embedder
from jaxinfer.outputs import EmbeddingRequestOutput
from jaxinfer.pooling_params import PoolingParams


class EncoderEngine:
    """Built by `jaxinfer.llm.build_engine`; `runner` is an EncoderRunner (device)."""

    def __init__(self, config: EngineConfig, *, runner, embedder: Embedder, tokenizer, model):
        self.config = config
        self.runner = runner
        self.embedder = embedder
        self.tokenizer = tokenizer
        self.model = model
        self._num_requests = 0

    @property
    def vocab_size(self) -> int:
        return self.model.model_config.vocab_size

    @property
    def num_compilations(self) -> int:
        return self.runner.num_compilations

    def warmup(self) -> int:
        self.embedder.warmup(self.runner)
        return self.num_compilations

    def encode(
        self, prompts, pooling_params: PoolingParams | None = None, use_tqdm: bool = True
    ) -> list[EmbeddingRequestOutput]:
        """One pooled embedding per prompt, in input order. Prompts are taken as `generate()`
        takes them (text is tokenized with the tokenizer's special tokens, e.g. [CLS] ... [SEP]).
        Pooling (mean or CLS) and normalization come from the folder's sentence-transformers
        files; without them mean pooling, not normalized; `PoolingParams(normalize=...)`
        overrides the normalization. A prompt longer than max_model_len raises ValueError before
        any device work (no silent truncation)."""
        if self.runner is None:
            raise RuntimeError("this engine was shut down: build a new LLM")
        if pooling_params is None:
            pooling_params = PoolingParams()
        elif not isinstance(pooling_params, PoolingParams):
            raise TypeError(f"pooling_params must be PoolingParams, got {type(pooling_params)}")
        encoded = intake.encode_prompts(prompts, self.tokenizer)
        for i, (_, token_ids) in enumerate(encoded):
            self.embedder.validate(token_ids, i)
        first = self._num_requests
        self._num_requests += len(encoded)
        requests = [
            (str(first + i), text, token_ids) for i, (text, token_ids) in enumerate(encoded)
        ]
        return self.embedder.run(self.runner, requests, pooling_params, use_tqdm)

    def shutdown(self) -> None:
        self.runner = None
        self.model = None
