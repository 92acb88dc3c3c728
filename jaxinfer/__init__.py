"""jaxinfer: an LLM inference engine on JAX/XLA with vLLM's offline API."""

from jaxinfer.config import EngineConfig
from jaxinfer.engine.engine import LLM, Engine
from jaxinfer.outputs import CompletionOutput, Logprob, RequestOutput
from jaxinfer.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "CompletionOutput",
    "Engine",
    "EngineConfig",
    "Logprob",
    "RequestOutput",
    "SamplingParams",
    "__version__",
]
