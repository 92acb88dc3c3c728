"""jaxinfer: an LLM inference engine on JAX/XLA with vLLM's offline API."""

from jaxinfer.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from jaxinfer.config import EngineConfig
from jaxinfer.engine.async_engine import AsyncEngine
from jaxinfer.engine.core import EngineCore
from jaxinfer.inputs import TextPrompt, TokensPrompt
from jaxinfer.llm import LLM, Engine
from jaxinfer.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    Logprob,
    RequestOutput,
)
from jaxinfer.pooling_params import PoolingParams
from jaxinfer.sampling_params import RequestOutputKind, SamplingParams
from jaxinfer.structured_outputs import GuidedDecodingParams, StructuredOutputsParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "AsyncEngine",
    "BeamSearchOutput",
    "BeamSearchParams",
    "BeamSearchSequence",
    "CompletionOutput",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "Engine",
    "EngineConfig",
    "EngineCore",
    "GuidedDecodingParams",
    "Logprob",
    "PoolingParams",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
    "StructuredOutputsParams",
    "TextPrompt",
    "TokensPrompt",
    "__version__",
]
