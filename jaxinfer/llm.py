"""`LLM` (alias `Engine`): vLLM's offline API, a facade over whichever engine the model needs.

    llm = LLM(model="path/to/folder-or.gguf", max_model_len=2048)
    llm.generate(prompts, SamplingParams(...)); llm.chat(messages); llm.stream(prompt)
    llm.encode(texts)                            # encoder (BERT) models
    llm.llm_engine                               # the engine below: add_request / step / abort

`build_engine` is the plain factory behind it: a decoder gets an `EngineCore`, an encoder an
`EncoderEngine`, `data_parallel_size > 1` a `DataParallelEngine` composed of D cores. This module
is where host and device are wired together: it loads the model and builds the runner (device),
then hands them to the host-side engine classes, which never import JAX themselves.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence as SequenceABC

from typing_extensions import Self

from jaxinfer.beam_search import BeamSearchOutput, BeamSearchParams
from jaxinfer.config import EngineConfig
from jaxinfer.engine import beam_search, intake, offline
from jaxinfer.engine.core import EngineCore
from jaxinfer.engine.data_parallel import DataParallelEngine
from jaxinfer.engine.encoder_engine import EncoderEngine
from jaxinfer.engine_args import engine_config
from jaxinfer.outputs import EmbeddingRequestOutput, RequestOutput
from jaxinfer.pooling_params import PoolingParams
from jaxinfer.sampling_params import SamplingParams

AnyEngine = EngineCore | EncoderEngine | DataParallelEngine


class LLM:
    """`LLM(model=PATH, **engine_args)`, `LLM(EngineConfig(...))` or `LLM(PATH, **fields)`.

    `engine_args` are EngineConfig fields plus vLLM's engine arguments at their neutral values
    (`trust_remote_code=False`, `task="auto"`, `quantization=None`, ...: `engine_args.py`).
    `devices`: the devices to run on (default `jax.devices()`).
    """

    def __init__(
        self, model: EngineConfig | str | None = None, *, devices=None, **engine_args
    ) -> None:
        config, task = engine_config(model, engine_args)
        self._multi_process = False
        self.llm_engine: AnyEngine | None = None
        self.llm_engine, self._multi_process = build_engine(config, devices)
        _check_task(task, self.llm_engine, config)

    # ---- what every engine has ----------------------------------------------------------------

    @property
    def config(self) -> EngineConfig:
        return self._engine.config

    @property
    def tokenizer(self):
        return self._engine.tokenizer

    @property
    def vocab_size(self) -> int:
        return self._engine.vocab_size

    @property
    def num_compilations(self) -> int:
        """Compiled executables so far; flat after `warmup()` whatever the request mix."""
        return self._engine.num_compilations

    def get_tokenizer(self):
        return self.tokenizer

    def warmup(self) -> int:
        """Compile every bucket now, so that no request mix compiles later. Returns the count."""
        return self._engine.warmup()

    def shutdown(self) -> None:
        """Drop the weights, the KV cache and compiled executables so the memory can be reused."""
        if self.llm_engine is not None:
            self.llm_engine.shutdown()
            self.llm_engine = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- generation ---------------------------------------------------------------------------

    def reset_prefix_cache(self) -> bool:
        """Forget the cached prefix blocks (vLLM's name): True when done, False (nothing
        changed) while requests still hold blocks."""
        return self._generative("reset_prefix_cache").reset_prefix_cache()

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's defaults, overridden by the checkpoint's generation_config.json."""
        return self._generative("get_default_sampling_params").default_sampling_params

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request=None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order. Every prompt is
        validated before any is queued, so one bad prompt leaves the engine untouched."""
        engine = self._generative("generate")
        if lora_request is not None:
            raise ValueError("lora_request: LoRA adapters are not supported; pass None")
        prepared = self._prepare(engine, prompts, sampling_params)
        return engine.generate_prepared(prepared, use_tqdm=use_tqdm)

    def stream(
        self, prompt, sampling_params: SamplingParams | None = None
    ) -> Iterator[RequestOutput]:
        """Yield one prompt's outputs as its tokens arrive (DELTA unless `output_kind` says
        otherwise); leaving the loop early aborts the request and frees its blocks."""
        engine = self._generative("stream")
        if not isinstance(engine, EngineCore):
            raise ValueError("stream() runs on one engine replica: data_parallel_size must be 1")
        (prepared,) = self._prepare(engine, [prompt], sampling_params)
        return offline.stream(engine, prepared)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request=None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """vLLM's `LLM.chat`: one conversation or a list of them, through the tokenizer's template.

        The prompt ids are exactly what `tokenizer.apply_chat_template(..., tokenize=True)` gives
        (the template places the special tokens itself); `RequestOutput.prompt` is the rendered
        text.
        """
        self._generative("chat")
        prompts = intake.render_chats(
            self.tokenizer,
            messages,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            chat_template_kwargs=chat_template_kwargs,
        )
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def beam_search(
        self,
        prompts,
        params: BeamSearchParams,
        lora_request=None,
        use_tqdm: bool = False,
        concurrency_limit: int | None = None,
    ) -> list[BeamSearchOutput]:
        """vLLM's `LLM.beam_search`: the `beam_width` best beams of each prompt, best first.
        Each step runs every live beam as a one-token request (the prefix cache serves the
        blocks beams share); the choices are transformers' `generate(num_beams=...)`'s
        (engine/beam_search.py). Bad prompts or params raise before any step is queued."""
        engine = self._generative("beam_search")
        if lora_request is not None:
            raise ValueError("lora_request: LoRA adapters are not supported; pass None")
        return beam_search.run(
            engine,
            prompts,
            params,
            prepare=lambda batch, sampling: self._prepare(engine, batch, sampling),
            use_tqdm=use_tqdm,
            concurrency_limit=concurrency_limit,
        )

    # ---- embeddings ---------------------------------------------------------------------------

    def encode(
        self, prompts, pooling_params: PoolingParams | None = None, use_tqdm: bool = True
    ) -> list[EmbeddingRequestOutput]:
        """vLLM's `LLM.encode`/`LLM.embed` for encoder models: one pooled embedding per prompt,
        in input order (see `EncoderEngine.encode`)."""
        engine = self._engine
        if not isinstance(engine, EncoderEngine):
            raise ValueError(
                f"encode() needs an embedding (encoder) model such as BertModel, but "
                f"{self.config.model!r} is a generative model: use generate() or chat()"
            )
        return engine.encode(prompts, pooling_params, use_tqdm)

    def embed(
        self, prompts, pooling_params: PoolingParams | None = None, use_tqdm: bool = True
    ) -> list[EmbeddingRequestOutput]:
        """vLLM's `LLM.embed`: the same as `encode()` here."""
        return self.encode(prompts, pooling_params, use_tqdm)

    # ---- helpers ------------------------------------------------------------------------------

    @property
    def _engine(self) -> AnyEngine:
        if self.llm_engine is None:
            raise RuntimeError("this engine was shut down: build a new LLM")
        return self.llm_engine

    def _generative(self, method: str) -> EngineCore | DataParallelEngine:
        engine = self._engine
        if isinstance(engine, EncoderEngine):
            raise ValueError(
                f"{method}() needs a generative (decoder) model, but {self.config.model!r} is an "
                "encoder (BertModel): use encode() for its embeddings"
            )
        return engine

    def _prepare(self, engine, prompts, sampling_params) -> list[intake.PreparedRequest]:
        if self._multi_process:  # every process runs the same steps: process 0's requests
            from jaxinfer.runtime.distributed import from_process_zero

            prompts, sampling_params = from_process_zero((prompts, sampling_params))
        prepared = intake.prepare_requests(
            prompts,
            sampling_params,
            tokenizer=engine.tokenizer,
            limits=engine.limits,
            default_params=engine.default_sampling_params,
        )
        engine.check_grammars(prepared)
        return prepared


Engine = LLM


def build_engine(config: EngineConfig, devices=None) -> tuple[AnyEngine, bool]:
    """The engine for `config`: -> (engine, whether several processes run it)."""
    if config.data_parallel_size > 1:
        from jaxinfer.runtime.mesh import build_mesh  # device side: imported late

        size = config.data_parallel_size
        grid = build_mesh(  # the first D x P x T devices, as [D, P, T]; raises if too few
            config.tensor_parallel_size, config.pipeline_parallel_size, size, devices
        ).devices
        replica_config = config.replace(data_parallel_size=1)
        replicas: list[AnyEngine] = []
        try:
            for group in grid.reshape(size, -1):
                replicas.append(build_engine(replica_config, list(group))[0])
        except BaseException:
            for replica in replicas:
                replica.shutdown()
            raise
        return DataParallelEngine(config, replicas), False
    return _build_single(config, devices)


def _build_single(config: EngineConfig, devices) -> tuple[EngineCore | EncoderEngine, bool]:
    import jax

    from jaxinfer.models.loader import (
        CheckpointSource,
        load_eos_token_ids,
        load_generation_defaults,
        load_model,
        load_tokenizer,
    )
    from jaxinfer.runtime import distributed, kv_cache
    from jaxinfer.runtime.host_allocator import keep_freed_memory_mapped
    from jaxinfer.runtime.program_cache import enable_compilation_cache
    from jaxinfer.runtime.runner import ModelRunner

    # Before any device is touched: joins jax.distributed when configured (several processes).
    multi_process = distributed.initialize(config)
    source = CheckpointSource.resolve(
        config.model, config.gguf_file, revision=config.revision, download_dir=config.download_dir
    )
    if config.compilation_cache_dir:
        enable_compilation_cache(config.compilation_cache_dir)
    if config.cpu_keep_freed_memory and jax.default_backend() == "cpu":
        keep_freed_memory_mapped()
    mesh = _build_mesh(config, devices)
    model = load_model(
        source,
        config.dtype,
        config.weight_cache_dir,
        mesh,
        config.pipeline_layer_partition,
        check_finite=config.check_weights_finite,
        quantization=config.quantization,
    )
    tokenizer = load_tokenizer(
        source, config.tokenizer, config.tokenizer_revision, config.download_dir
    )
    if model.is_encoder:
        return _build_encoder(config, model, tokenizer, source), multi_process
    length_from_model = config.max_model_len is None
    config = _resolve_lengths(config, model.model_config.max_position_embeddings)
    kv_dtype = kv_cache.cache_dtype(config.kv_cache_dtype, model.dtype)
    num_blocks = kv_cache.num_blocks_for(config, model.model_config, kv_dtype, model.weight_bytes)
    _check_kv_capacity(config, num_blocks, length_from_model)
    vocab_size = model.model_config.vocab_size
    runner = ModelRunner(
        model,
        num_blocks,
        config.block_size,
        num_slots=config.max_num_seqs * config.resolved_micro_batches,
        num_logprobs=vocab_size
        if config.max_logprobs == -1
        else min(config.max_logprobs, vocab_size),
        attention_backend=config.attention_backend,
        mesh=mesh,
        batch_invariant=config.batch_invariant,
        kv_cache_dtype=kv_dtype,
    )
    core = EngineCore(
        config,
        runner=runner,
        tokenizer=tokenizer,
        eos_token_ids=set(load_eos_token_ids(source, model.hf_config, tokenizer)),
        default_sampling_params=SamplingParams(**load_generation_defaults(source)),
        num_blocks=num_blocks,
        vocab_size=vocab_size,
        model=model,
        mesh=mesh,
    )
    return core, multi_process


def _build_encoder(config: EngineConfig, model, tokenizer, source) -> EncoderEngine:
    """Pooling from the folder's sentence-transformers files; max_model_len defaults, as in
    vLLM, to the length the model was trained for."""
    from jaxinfer.engine.embedding import Embedder
    from jaxinfer.engine.encoder_batching import EncoderBucketTable
    from jaxinfer.models.pooling import load_pooling_config
    from jaxinfer.runtime.encoder_runner import EncoderRunner

    pooling = load_pooling_config(source.folder)
    model_max = model.model_config.max_position_embeddings
    if config.max_model_len is None and pooling.max_seq_length:
        config = config.replace(max_model_len=min(pooling.max_seq_length, model_max))
    config = _resolve_lengths(config, model_max)
    buckets = EncoderBucketTable.build(
        config.max_num_seqs, config.max_model_len, config.max_num_batched_tokens
    )
    pad_id = getattr(model.hf_config, "pad_token_id", None) or 0
    embedder = Embedder(buckets, pooling, model.model_config.vocab_size, pad_id)
    runner = EncoderRunner(model, pooling.mode)
    return EncoderEngine(config, runner=runner, embedder=embedder, tokenizer=tokenizer, model=model)


def _check_kv_capacity(
    config: EngineConfig, num_blocks: int, length_from_model: bool = False
) -> None:
    """vLLM's start-up check: the cache must hold one max_model_len sequence, or a request the
    model accepts could never be scheduled. Raised before the cache is allocated.
    `length_from_model`: max_model_len was not given, so the checkpoint's config chose it."""
    capacity = (num_blocks - 1) * config.block_size  # block 0 is the padding target
    if capacity < config.max_model_len:
        origin = (
            f"max_model_len was not given, so it is the model's max_position_embeddings="
            f"{config.max_model_len} (from {config.model}'s config); "
            if length_from_model
            else ""
        )
        raise ValueError(
            f"{origin}the KV cache holds {capacity} tokens ({num_blocks - 1} usable blocks of "
            f"{config.block_size}), fewer than one sequence of max_model_len="
            f"{config.max_model_len}: lower max_model_len to at most {capacity}, or give the "
            "cache more room (num_kv_blocks, kv_cache_memory_bytes, gpu_memory_utilization)"
        )


def _resolve_lengths(config: EngineConfig, model_max: int) -> EngineConfig:
    if config.max_model_len is None:
        return config.replace(max_model_len=model_max)
    if config.max_model_len > model_max:
        raise ValueError(
            f"EngineConfig.max_model_len={config.max_model_len} exceeds the model's "
            f"max_position_embeddings={model_max}"
        )
    return config


def _build_mesh(config: EngineConfig, devices=None):
    """The device mesh of one replica (runtime/mesh.py), or None for the default device.

    Given `devices` (a data-parallel replica's group), even T == P == 1 gets a one-device mesh, so
    the replica's weights, KV cache and steps are committed to its own device."""
    t, p = config.tensor_parallel_size, config.pipeline_parallel_size
    if t == 1 and p == 1 and devices is None:
        return None
    import jax

    from jaxinfer.runtime.mesh import build_mesh

    if p > 1 and jax.process_count() > 1:
        raise ValueError(
            f"pipeline_parallel_size {p} across several processes is not supported: stages hand "
            "hidden states from one device group to the next inside one process; use "
            "tensor_parallel_size across processes instead"
        )
    return build_mesh(t, p, devices=devices)


def _check_task(task: str, engine: AnyEngine, config: EngineConfig) -> None:
    """vLLM's `task=`: "auto", or the kind the model is ("generate" / "embed")."""
    kind = "embed" if isinstance(engine, EncoderEngine) else "generate"
    if task not in ("auto", kind):
        engine.shutdown()
        raise ValueError(
            f"task={task!r} does not fit {config.model!r}, which is "
            f"{'an embedding' if kind == 'embed' else 'a generative'} model: use task={kind!r} "
            "or 'auto'"
        )
