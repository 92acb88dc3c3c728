"""The host side of `Engine.encode()`: validate, batch into buckets, pool, normalize, wrap.

An encoder needs none of the decoder's machinery (scheduler, KV blocks, sampling): every prompt
runs once, so batching is a sort by length into the bucket grid of `encoder_batching`. The device
work is one call per batch on the runner (`runtime/encoder_runner.py`); nothing here imports JAX.
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from jaxinfer.engine.encoder_batching import EncoderBucketTable, pad_batch
from jaxinfer.models.pooling import PoolingConfig
from jaxinfer.outputs import EmbeddingOutput, EmbeddingRequestOutput
from jaxinfer.pooling_params import PoolingParams


class Embedder:
    """Host state of an encoder engine. The runner is passed per call, not held, so that
    `Engine.shutdown()` dropping its runner frees the weights."""

    def __init__(
        self,
        buckets: EncoderBucketTable,
        pooling: PoolingConfig,
        vocab_size: int,
        pad_token_id: int = 0,
    ) -> None:
        self.buckets = buckets
        self.pooling = pooling
        self.vocab_size = vocab_size
        self.pad_token_id = pad_token_id

    def validate(self, token_ids: list[int], index: int) -> None:
        """Raised before any device work, so one bad prompt costs nothing."""
        if not token_ids:
            raise ValueError(f"prompt {index} is empty: at least one token is needed")
        if len(token_ids) > self.buckets.max_len:
            raise ValueError(
                f"prompt {index} has {len(token_ids)} tokens, more than this encoder's "
                f"max_model_len={self.buckets.max_len} (its max_position_embeddings, or the "
                "sentence-transformers max_seq_length); shorten it"
            )
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(
                f"prompt {index}: token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})"
            )

    def warmup(self, runner) -> None:
        for bucket in self.buckets.all_buckets():
            runner.compile(bucket)

    def run(
        self,
        runner,  # EncoderRunner: execute(bucket, token_ids, lengths) -> pooled [S, E]
        requests: list[tuple[str, str | None, list[int]]],  # (request_id, prompt, token ids)
        params: PoolingParams,
        use_tqdm: bool,
    ) -> list[EmbeddingRequestOutput]:
        """Embeddings of validated requests, in input order."""
        normalize = self.pooling.normalize if params.normalize is None else params.normalize
        embeddings: list[np.ndarray | None] = [None] * len(requests)
        lengths = [len(ids) for _, _, ids in requests]
        with tqdm(total=len(requests), desc="Processed prompts", disable=not use_tqdm) as progress:
            for rows, bucket in self.buckets.plan(lengths):
                token_ids, row_lengths = pad_batch(
                    [requests[i][2] for i in rows], bucket, self.pad_token_id
                )
                pooled = runner.execute(bucket, token_ids, row_lengths)
                for row, index in enumerate(rows):
                    embeddings[index] = pooled[row]
                progress.update(len(rows))
        outputs = []
        for (request_id, prompt, ids), vector in zip(requests, embeddings, strict=True):
            if normalize:  # as torch.nn.functional.normalize: v / max(||v||, 1e-12)
                vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
            outputs.append(
                EmbeddingRequestOutput(
                    request_id=request_id,
                    prompt=prompt,
                    prompt_token_ids=list(ids),
                    outputs=EmbeddingOutput(embedding=vector.tolist()),
                )
            )
        return outputs
