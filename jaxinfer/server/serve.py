"""`jaxinfer serve [MODEL]`: the OpenAI-compatible server on uvicorn, with vLLM's flags.

    jaxinfer serve                                   # the default SmolLM2, on 127.0.0.1:8000
    jaxinfer serve path/to/model --max-model-len 2048 --max-num-seqs 16 --api-key KEY

Engine flags carry vLLM's names and go, as keyword arguments, through the same path as
`LLM(**engine_args)` (jaxinfer/engine_args.py): EngineConfig fields are set, vLLM arguments that
change nothing here are accepted, and values jaxinfer cannot honour are refused by name. A
`--config FILE` (configs/*.yaml) gives the base config; flags override it, and its `sampling:`
fills in what requests leave out.

Start-up compiles every shape bucket (as vLLM captures its graphs), so no request waits for a
compile later (`--no-warmup` skips it). SIGTERM or Ctrl-C: uvicorn stops accepting connections,
lets requests in flight finish for `--shutdown-timeout` seconds, then cancels (and so aborts)
the rest; the engine then frees its device memory and the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any

# vLLM's engine flags: (flag, EngineConfig / LLM() argument, type). Only flags given are passed.
ENGINE_FLAGS: tuple[tuple[str, str, Any], ...] = (
    ("--tokenizer", "tokenizer", str),
    ("--dtype", "dtype", str),
    ("--seed", "seed", int),
    ("--max-model-len", "max_model_len", int),
    ("--block-size", "block_size", int),
    ("--kv-cache-dtype", "kv_cache_dtype", str),
    ("--gpu-memory-utilization", "gpu_memory_utilization", float),
    ("--kv-cache-memory-bytes", "kv_cache_memory_bytes", int),
    ("--num-gpu-blocks-override", "num_kv_blocks", int),
    ("--max-num-seqs", "max_num_seqs", int),
    ("--max-num-batched-tokens", "max_num_batched_tokens", int),
    ("--max-logprobs", "max_logprobs", int),
    ("--num-scheduler-steps", "num_scheduler_steps", int),
    ("--tensor-parallel-size", "tensor_parallel_size", int),
    ("--pipeline-parallel-size", "pipeline_parallel_size", int),
    ("--data-parallel-size", "data_parallel_size", int),
    ("--quantization", "quantization", str),
    ("--load-format", "load_format", str),
    ("--swap-space", "swap_space", float),
    ("--compilation-cache-dir", "compilation_cache_dir", str),
)
# vLLM's on/off flags (--x / --no-x), passed only when given.
SWITCHES = (
    ("--enable-prefix-caching", "enable_prefix_caching"),
    ("--async-scheduling", "async_scheduling"),
    ("--trust-remote-code", "trust_remote_code"),
    ("--enforce-eager", "enforce_eager"),
    ("--disable-log-stats", "disable_log_stats"),
)
SHORT = {"--tensor-parallel-size": "-tp", "--pipeline-parallel-size": "-pp",
         "--data-parallel-size": "-dp", "--quantization": "-q"}  # fmt: skip


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve", help="serve a model over the OpenAI API (vLLM's `vllm serve`)"
    )
    serve.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                       help="checkpoint folder or .gguf file (default: SmolLM2-135M)")  # fmt: skip
    serve.add_argument("--model", default=None, help="the same as MODEL")
    serve.add_argument("--config", help="a YAML engine config (configs/*.yaml); flags override it")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    serve.add_argument("--served-model-name", default=None, help="default: MODEL as given")
    engine = serve.add_argument_group(
        "engine", "vLLM's engine arguments, passed to LLM() only when given (engine_args.py)"
    )
    for flag, name, kind in ENGINE_FLAGS:
        names = [flag, SHORT[flag]] if flag in SHORT else [flag]
        engine.add_argument(*names, type=kind, default=None, help=f"LLM({name}=...)")
    for flag, name in SWITCHES:
        engine.add_argument(
            flag, action=argparse.BooleanOptionalAction, default=None, help=f"LLM({name}=...)"
        )
    serve.add_argument("--no-warmup", action="store_true", help="compile shapes on first use")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds requests in flight get to finish on SIGTERM")  # fmt: skip
    serve.add_argument("--uvicorn-log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug", "trace"])  # fmt: skip
    serve.add_argument("--disable-uvicorn-access-log", action="store_true")


def engine_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The engine flags given on the command line, under their LLM() names."""
    given = {name: getattr(args, _dest(flag)) for flag, name, _ in ENGINE_FLAGS}
    given.update({name: getattr(args, _dest(flag)) for flag, name in SWITCHES})
    return {name: value for name, value in given.items() if value is not None}


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from jaxinfer.server.app import build_app
    except ImportError as error:
        raise ValueError(
            f"serving needs the serve extra ({error.name} is missing): "
            "pip install 'jaxinfer[serve]'"
        ) from None
    llm, name, sampling = _build_llm(args)
    try:
        engine = _async_engine(llm)
        if not args.no_warmup:
            print(f"jaxinfer: compiling every shape of {name} (--no-warmup skips)", file=sys.stderr)
            llm.warmup()
        app = build_app(
            engine, name, args.api_key, model_root=llm.config.model, sampling_defaults=sampling,
            shutdown_engine=True,
        )  # fmt: skip
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.uvicorn_log_level,
            access_log=not args.disable_uvicorn_access_log,
            timeout_graceful_shutdown=args.shutdown_timeout,
        )
        _serve_until_signal(uvicorn.Server(config))
    finally:
        llm.shutdown()
    return 0


def _build_llm(args: argparse.Namespace):
    """-> (LLM, served model name, the config file's sampling defaults)."""
    from jaxinfer.config_file import load_config_file
    from jaxinfer.default_model import default_model_path, resolve_model_path
    from jaxinfer.engine_args import engine_config
    from jaxinfer.llm import LLM

    model_arg = args.model_tag or args.model
    engine_args = engine_arguments(args)
    sampling: dict[str, Any] = {}
    if args.config:
        loaded = load_config_file(args.config)
        base, sampling = loaded.engine, dict(loaded.sampling)
        if model_arg:
            engine_args["model"] = resolve_model_path(model_arg)
    else:
        base = resolve_model_path(model_arg) if model_arg else str(default_model_path())
    config, task = engine_config(base, engine_args)  # what LLM(base, **engine_args) builds
    if config.data_parallel_size > 1:
        raise ValueError(
            "--data-parallel-size > 1 is not served yet: the server drives one engine replica "
            "(run one server per replica behind a load balancer)"
        )
    llm = LLM(config, task=task)
    name = args.served_model_name or model_arg or Path(config.model).name
    return llm, name, sampling


def _async_engine(llm):
    from jaxinfer.engine.async_engine import AsyncEngine
    from jaxinfer.engine.encoder_engine import EncoderEngine
    from jaxinfer.server.embeddings import AsyncEncoder

    if isinstance(llm.llm_engine, EncoderEngine):
        return AsyncEncoder(llm)
    return AsyncEngine(llm)


def _serve_until_signal(server) -> None:
    """uvicorn handles SIGINT/SIGTERM itself (graceful shutdown), then re-raises the signal so
    the default action kills the process. Our own no-op handlers underneath turn that re-raise
    into a normal return, so the engine shuts down and the process exits 0."""
    received: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda number, frame: received.append(number))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        logging.getLogger("jaxinfer").info("stopped by signal %s", received[0])


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")
