"""jaxinfer: an LLM inference engine on JAX/XLA with vLLM's offline API."""

from jaxinfer.config import EngineConfig
from jaxinfer.engine.engine import LLM, Engine
from jaxinfer.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    Logprob,
    RequestOutput,
)
from jaxinfer.pooling_params import PoolingParams
from jaxinfer.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "CompletionOutput",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "Engine",
    "EngineConfig",
    "Logprob",
    "PoolingParams",
    "RequestOutput",
    "SamplingParams",
    "__version__",
]
