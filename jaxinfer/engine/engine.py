"""Engine: tokenize -> add requests -> step loop -> detokenize. vLLM's offline `LLM`, on JAX.

The engine itself stays on the host side of the seam: it owns the scheduler and block manager and
hands each StepPlan, padded into its bucket, to the ModelRunner. Everything it raises for bad input
is raised before any request is added, so one bad prompt leaves the engine and its cache untouched.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm
from typing_extensions import Self

from jaxinfer.config import EngineConfig
from jaxinfer.engine.batching import BucketTable, RowSampling, StepInputs, build_step_inputs
from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.embedding import Embedder
from jaxinfer.engine.scheduler import Scheduler, SchedulerGroup, StepPlan
from jaxinfer.engine.sequence import Sequence, SequenceStatus
from jaxinfer.engine.stop_strings import StopStringMatcher
from jaxinfer.outputs import CompletionOutput, EmbeddingRequestOutput, Logprob, RequestOutput
from jaxinfer.pooling_params import PoolingParams
from jaxinfer.sampling_params import SamplingParams

logger = logging.getLogger("jaxinfer")

PromptType = str | list[int] | dict


@dataclass(frozen=True)
class _InFlight:
    """A dispatched step whose outputs are not read back yet."""

    group: int  # the micro-batch (scheduler) it belongs to
    plan: StepPlan
    inputs: StepInputs
    outputs: dict  # device arrays (runner.dispatch)


@dataclass
class _Sample:
    """One of a request's n samples: its sequence and what its output accumulates."""

    request_id: str
    prompt: str | None
    params: SamplingParams
    index: int  # which of the request's n samples
    seed: int  # uint32 key seed: row_seed(request seed, index)
    seq: Sequence
    stop_matcher: StopStringMatcher | None = None
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences; see _bad_word_token_ids
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    # prompt position -> its logprobs entry (filled chunk by chunk during prefill)
    prompt_logprobs: dict[int, dict[int, Logprob]] = field(default_factory=dict)
    group: int = 0  # the micro-batch (scheduler of the engine's group) its sequence runs in


def request_seed(engine_seed: int, request_index: int) -> int:
    """The key seed of an unseeded request: a function of the engine seed and submission order."""
    return int(np.random.SeedSequence([engine_seed, request_index]).generate_state(1)[0])


class Engine:
    """`Engine(EngineConfig(model=PATH))`, or vLLM-style `Engine(model=PATH, dtype=...)`.

    `devices`: the devices to run on (default `jax.devices()`; the first T are used under tensor
    parallelism). With `data_parallel_size=D > 1` this builds a `DataParallelEngine`: D replicas
    over disjoint groups of `devices` (engine/data_parallel.py).
    """

    def __new__(cls, config: EngineConfig | str | None = None, *, devices=None, **kwargs):
        if cls is Engine and _as_config(config, kwargs).data_parallel_size > 1:
            from jaxinfer.engine.data_parallel import DataParallelEngine

            return super().__new__(DataParallelEngine)
        return super().__new__(cls)

    def __init__(self, config: EngineConfig | str | None = None, *, devices=None, **kwargs) -> None:
        # Device-side imports live here so that `jaxinfer.engine` stays importable without JAX.
        import jax

        from jaxinfer.models.loader import (
            CheckpointSource,
            load_eos_token_ids,
            load_generation_defaults,
            load_model,
            load_tokenizer,
        )
        from jaxinfer.runtime import kv_cache
        from jaxinfer.runtime.host_allocator import keep_freed_memory_mapped
        from jaxinfer.runtime.runner import ModelRunner, enable_compilation_cache

        config = _as_config(config, kwargs)
        from jaxinfer.runtime import distributed

        # Before any device is touched: joins jax.distributed when configured (several processes).
        self._multi_process = distributed.initialize(config)
        source = CheckpointSource.resolve(config.model, config.gguf_file)
        if config.compilation_cache_dir:
            enable_compilation_cache(config.compilation_cache_dir)
        if config.cpu_keep_freed_memory and jax.default_backend() == "cpu":
            keep_freed_memory_mapped()
        self.mesh = _build_mesh(config, devices)
        self.model = load_model(source, config.dtype, config.weight_cache_dir, self.mesh)
        self.tokenizer = load_tokenizer(source, config.tokenizer)
        self.embedder: Embedder | None = None  # set for encoder models (encode())
        if self.model.is_encoder:
            self._start_encoder(source, config)
            return
        self.config = config = self._resolve_lengths(config)
        self.eos_token_ids = load_eos_token_ids(source, self.model.hf_config, self.tokenizer)
        self.default_sampling_params = SamplingParams(**load_generation_defaults(source))
        num_blocks = kv_cache.num_blocks_for(
            config, self.model.model_config, self.model.dtype, self.model.weight_bytes
        )
        # One scheduler per micro-batch in flight (pipeline parallelism; otherwise just one),
        # each running up to max_num_seqs sequences, all sharing the KV blocks.
        micro_batches = config.resolved_micro_batches
        num_slots = config.max_num_seqs * micro_batches
        self.runner = ModelRunner(
            self.model,
            num_blocks,
            config.block_size,
            num_slots=num_slots,
            num_logprobs=self._num_logprobs(config),
            attention_backend=config.attention_backend,
            mesh=self.mesh,
        )
        self._free_slots = list(range(num_slots))
        self._slot_of: dict[int, int] = {}  # seq_id -> sampling-state slot, while running
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.scheduler = SchedulerGroup(
            [
                Scheduler(
                    self.block_manager,
                    max_num_seqs=config.max_num_seqs,
                    max_num_batched_tokens=config.max_num_batched_tokens,
                    max_prefill_seqs=config.max_prefill_seqs,
                    max_model_len=config.max_model_len,
                )
                for _ in range(micro_batches)
            ]
        )
        self.buckets = BucketTable(
            seq_buckets=config.resolved_seq_buckets(),
            token_buckets=config.resolved_token_buckets(),
            block_buckets=config.resolved_block_buckets(),
            max_prefill_seqs=config.max_prefill_seqs,
        )
        self._num_requests = 0
        self._num_seqs = 0
        self._token_text: dict[int, str] = {}

    def _start_encoder(self, source, config: EngineConfig) -> None:
        """An encoder (BERT) needs no KV cache, scheduler or sampler: an EncoderRunner (device)
        and an Embedder (host batching and pooling) replace them."""
        from jaxinfer.engine.encoder_batching import EncoderBucketTable
        from jaxinfer.models.pooling import load_pooling_config
        from jaxinfer.runtime.encoder_runner import EncoderRunner

        pooling = load_pooling_config(source.folder)
        if config.max_model_len is None and pooling.max_seq_length:  # as vLLM: the trained length
            model_max = self.model.model_config.max_position_embeddings
            config = config.replace(max_model_len=min(pooling.max_seq_length, model_max))
        self.config = config = self._resolve_lengths(config)
        self.runner = EncoderRunner(self.model, pooling.mode)
        buckets = EncoderBucketTable.build(
            config.max_num_seqs, config.max_model_len, config.max_num_batched_tokens
        )
        pad_id = getattr(self.model.hf_config, "pad_token_id", None) or 0
        self.embedder = Embedder(buckets, pooling, self.vocab_size, pad_id)
        self._num_requests = 0

    def _require_kind(self, method: str, encoder: bool) -> None:
        """encode() is for encoders, generate()/chat() for decoders: say which model is which."""
        if (self.embedder is not None) == encoder:
            return
        if encoder:
            raise ValueError(
                f"{method}() needs an embedding (encoder) model such as BertModel, but "
                f"{self.config.model!r} is a generative model: use generate() or chat()"
            )
        raise ValueError(
            f"{method}() needs a generative (decoder) model, but {self.config.model!r} is an "
            "encoder (BertModel): use encode() for its embeddings"
        )

    def _num_logprobs(self, config: EngineConfig) -> int:
        """Top logprobs each step can return: max_logprobs, or the whole vocabulary for -1."""
        vocab = self.model.model_config.vocab_size
        return vocab if config.max_logprobs == -1 else min(config.max_logprobs, vocab)

    def _resolve_lengths(self, config: EngineConfig) -> EngineConfig:
        model_max = self.model.model_config.max_position_embeddings
        if config.max_model_len is None:
            return config.replace(max_model_len=model_max)
        if config.max_model_len > model_max:
            raise ValueError(
                f"EngineConfig.max_model_len={config.max_model_len} exceeds the model's "
                f"max_position_embeddings={model_max}"
            )
        return config

    # ---- public API ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.model.model_config.vocab_size

    @property
    def num_compilations(self) -> int:
        """Compiled executables so far; flat after `warmup()` whatever the request mix."""
        return self.runner.num_compilations

    def get_tokenizer(self):
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's defaults, overridden by the checkpoint's generation_config.json."""
        return self.default_sampling_params

    def warmup(self) -> int:
        """Compile every bucket now, so that no request mix compiles later. Returns the count."""
        if self.embedder is not None:
            self.embedder.warmup(self.runner)
            return self.num_compilations
        for bucket in self.buckets.all_buckets():
            self.runner.compile(bucket)
        self.runner.compile_block_copier()
        return self.num_compilations

    def generate(
        self,
        prompts: PromptType | SequenceABC[PromptType],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order."""
        self._require_kind("generate", encoder=False)
        if self.runner is None:
            raise RuntimeError("this engine was shut down: build a new Engine")
        encoded, params_list = self._prepare(prompts, sampling_params)
        requests = [
            self._add_request(text, token_ids, params)
            for (text, token_ids), params in zip(encoded, params_list, strict=True)
        ]
        self._run([sample for samples in requests for sample in samples], use_tqdm)
        return [self._request_output(samples) for samples in requests]

    def _prepare(
        self,
        prompts: PromptType | SequenceABC[PromptType],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None,
    ) -> tuple[list[tuple[str | None, list[int]]], list[SamplingParams]]:
        """-> ((text, token ids), params) per prompt, every one validated before any device work."""
        if self._multi_process:  # every process runs the same steps: process 0's requests
            from jaxinfer.runtime.distributed import from_process_zero

            prompts, sampling_params = from_process_zero((prompts, sampling_params))
        prompt_list = _as_prompt_list(prompts)
        params_list = self._params_for(prompt_list, sampling_params)
        encoded = [self._encode(prompt, i) for i, prompt in enumerate(prompt_list)]
        for (_, token_ids), params in zip(encoded, params_list, strict=True):
            self._validate_request(token_ids, params)
        return encoded, params_list

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
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
        self._require_kind("chat", encoder=False)
        conversations = _as_conversations(messages)
        template = chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError(
                "the tokenizer has no chat template: pass chat_template= (a Jinja template "
                "string), or use generate() with plain prompts"
            )
        options = {
            "chat_template": template,
            "add_generation_prompt": add_generation_prompt,
            "continue_final_message": continue_final_message,
            **(chat_template_kwargs or {}),
        }
        prompts = []
        for conversation in conversations:
            text = self.tokenizer.apply_chat_template(conversation, tokenize=False, **options)
            ids = self.tokenizer.apply_chat_template(
                conversation, tokenize=True, return_dict=False, **options
            )
            prompts.append({"prompt": text, "prompt_token_ids": list(ids)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def encode(
        self,
        prompts: PromptType | SequenceABC[PromptType],
        pooling_params: PoolingParams | None = None,
        use_tqdm: bool = True,
    ) -> list[EmbeddingRequestOutput]:
        """vLLM's `LLM.encode`/`LLM.embed` for encoder models: one pooled embedding per prompt,
        in input order. Prompts are taken as `generate()` takes them (text is tokenized with the
        tokenizer's special tokens, e.g. [CLS] ... [SEP]). Pooling (mean or CLS) and normalization
        come from the folder's sentence-transformers files; without them mean pooling, not
        normalized; `PoolingParams(normalize=...)` overrides the normalization.

        A prompt longer than max_model_len raises ValueError before any device work (no silent
        truncation).
        """
        self._require_kind("encode", encoder=True)
        if self.runner is None:
            raise RuntimeError("this engine was shut down: build a new Engine")
        if pooling_params is None:
            pooling_params = PoolingParams()
        elif not isinstance(pooling_params, PoolingParams):
            raise TypeError(f"pooling_params must be PoolingParams, got {type(pooling_params)}")
        encoded = [self._encode(prompt, i) for i, prompt in enumerate(_as_prompt_list(prompts))]
        for i, (_, token_ids) in enumerate(encoded):
            self.embedder.validate(token_ids, i)
        first = self._num_requests
        self._num_requests += len(encoded)
        requests = [
            (str(first + i), text, token_ids) for i, (text, token_ids) in enumerate(encoded)
        ]
        return self.embedder.run(self.runner, requests, pooling_params, use_tqdm)

    def embed(
        self,
        prompts: PromptType | SequenceABC[PromptType],
        pooling_params: PoolingParams | None = None,
        use_tqdm: bool = True,
    ) -> list[EmbeddingRequestOutput]:
        """vLLM's `LLM.embed`: the same as `encode()` here."""
        return self.encode(prompts, pooling_params, use_tqdm)

    def shutdown(self) -> None:
        """Drop the weights, the KV cache and compiled executables so the memory can be reused."""
        if getattr(self, "runner", None) is not None:
            self.runner.shutdown()
            self.runner = None
        self.model = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- request intake -----------------------------------------------------------------------

    def _params_for(self, prompts: list, sampling_params) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.default_sampling_params] * len(prompts)
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * len(prompts)
        params = list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(
                f"sampling_params has {len(params)} entries for {len(prompts)} prompts; "
                "pass one SamplingParams or one per prompt"
            )
        for p in params:
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling_params entries must be SamplingParams, got {type(p)}")
        return params

    def _encode(self, prompt: PromptType, index: int) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"], list(self.tokenizer.encode(prompt["prompt"]))
            raise ValueError(f"prompt {index}: a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, list | tuple) and all(
            isinstance(t, int | np.integer) for t in prompt
        ):
            return None, [int(t) for t in prompt]
        raise TypeError(
            f"prompt {index}: expected str, list of token ids or a dict, got {type(prompt).__name__}"
        )

    def _validate_request(self, token_ids: list[int], params: SamplingParams) -> None:
        max_len = self.config.max_model_len
        if not token_ids:
            raise ValueError("prompt is empty: at least one token is needed")
        if len(token_ids) >= max_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens; it must be shorter than "
                f"max_model_len={max_len} to leave room for a generated token"
            )
        vocab = self.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        params.validate_for_model(vocab, self.config.max_logprobs)
        if params.n > self.config.max_num_seqs:
            raise ValueError(
                f"SamplingParams.n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}: "
                "a request's samples run side by side"
            )

    def _add_request(self, text, token_ids: list[int], params: SamplingParams) -> list[_Sample]:
        """Queue a request's n samples; the first one prefills the prompt for all (scheduler)."""
        from jaxinfer.runtime.sampling_tensors import row_seed  # device side: imported late

        index = self._num_requests
        self._num_requests += 1
        room = self.config.max_model_len - len(token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        seed = params.seed if params.seed is not None else request_seed(self.config.seed, index)
        bad_words = self._bad_word_token_ids(params.bad_words or [])
        samples = []
        for i in range(params.n):
            seq = Sequence(seq_id=self._num_seqs, prompt_token_ids=token_ids, max_tokens=max_tokens)
            self._num_seqs += 1
            matcher = None
            if params.stop:
                matcher = StopStringMatcher(
                    self.tokenizer,
                    params.stop,
                    include_stop_str_in_output=params.include_stop_str_in_output,
                    skip_special_tokens=params.skip_special_tokens,
                )
            samples.append(
                _Sample(str(index), text, params, i, row_seed(seed, i), seq, matcher, bad_words)
            )
        group = self.scheduler.add(samples[0].seq, [sample.seq for sample in samples[1:]])
        for sample in samples:
            sample.group = group
        return samples

    # ---- the step loop ------------------------------------------------------------------------

    def _run(self, requests: list[_Sample], use_tqdm: bool) -> None:
        """Step until every request is done, one step in flight per scheduler of the group.

        With one scheduler this is the plain loop: schedule, run, read back, update. Under
        pipeline parallelism each micro-batch's scheduler dispatches its next step as soon as its
        previous one is read back, while the other micro-batches are still in later stages.
        """
        by_seq = {r.seq.seq_id: r for r in requests}
        progress = tqdm(total=len(requests), desc="Processed prompts", disable=not use_tqdm)
        started, generated, prefilled = time.perf_counter(), 0, 0
        in_flight: deque[_InFlight] = deque()
        try:
            while True:
                busy = {step.group for step in in_flight}
                for group, scheduler in enumerate(self.scheduler):
                    if group not in busy and scheduler.has_unfinished:
                        step = self._dispatch(group, by_seq)
                        if step is not None:
                            in_flight.append(step)
                if not in_flight:
                    break
                step = in_flight.popleft()
                outputs = self.runner.collect(step.outputs)
                plan = step.plan
                if plan.is_prefill:
                    self._record_prompt_logprobs(plan, step.inputs, outputs, by_seq)
                    prefilled += plan.num_tokens
                sampled = {}
                for row, item in enumerate(plan.scheduled):
                    if item.samples:
                        sampled[item.seq.seq_id] = int(outputs["tokens"][row])
                        self._record_logprobs(by_seq[item.seq.seq_id], outputs, row)
                for seq in self.scheduler[step.group].update(plan, sampled):
                    generated += 1
                    if self._check_stop(seq, by_seq[seq.seq_id]):
                        self._release_slot(seq.seq_id)
                        progress.update(1)
                elapsed = max(time.perf_counter() - started, 1e-9)
                progress.set_postfix_str(  # vLLM's wording
                    f"est. speed input: {prefilled / elapsed:.2f} toks/s, "
                    f"output: {generated / elapsed:.2f} toks/s"
                )
        except BaseException:
            for request in requests:  # never leave blocks behind on an interrupted call
                self.scheduler.abort(request.seq.seq_id)
                self._release_slot(request.seq.seq_id)
            raise
        finally:
            progress.close()

    def _dispatch(self, group: int, by_seq: dict[int, _Sample]) -> _InFlight | None:
        """Schedule micro-batch `group`'s next step and start it on the device."""
        plan = self.scheduler[group].schedule()
        if plan is None:
            return None
        self._assign_slots(plan, by_seq)
        sampling = {
            item.seq.seq_id: self._row_sampling(by_seq[item.seq.seq_id]) for item in plan.scheduled
        }
        bucket = self.buckets.select(plan, self.config.block_size)
        inputs = build_step_inputs(
            plan,
            bucket,
            self.config.block_size,
            sampling,
            padding_slot=self.runner.slot_state.padding_slot,
            vocab_size=self.vocab_size,
        )
        self.runner.copy_blocks(plan.block_copies)
        return _InFlight(group, plan, inputs, self.runner.dispatch(bucket, inputs))

    # ---- sampling state -----------------------------------------------------------------------

    def _assign_slots(self, plan, by_seq: dict[int, _Sample]) -> None:
        """Give each scheduled sequence a sampling-state slot, writing its row when it gets one.

        A preempted sequence gives its slot back (it is no longer running); when it runs again
        its row is rebuilt from its outputs so far, so penalties count exactly as before.
        """
        from jaxinfer.runtime.sampling_tensors import SamplingRow, build_sampling_tensors
        from jaxinfer.runtime.slot_state import row_of

        preempted = [i for i in self._slot_of if by_seq[i].seq.status is not SequenceStatus.RUNNING]
        for seq_id in preempted:
            self._release_slot(seq_id)
        for item in plan.scheduled:
            seq = item.seq
            if seq.seq_id in self._slot_of:
                continue
            request = by_seq[seq.seq_id]
            slot = self._free_slots.pop()
            self._slot_of[seq.seq_id] = slot
            row = SamplingRow(
                params=request.params,
                seed=request.seed,
                prompt_token_ids=seq.prompt_token_ids,
                output_token_ids=seq.output_token_ids,
                eos_token_ids=sorted(self.eos_token_ids),
                banned_token_ids=[ids[0] for ids in request.bad_words if len(ids) == 1],
            )
            self.runner.write_slot(slot, row_of(build_sampling_tensors([row], self.vocab_size)))

    def _release_slot(self, seq_id: int) -> None:
        slot = self._slot_of.pop(seq_id, None)
        if slot is not None:
            self._free_slots.append(slot)

    def _row_sampling(self, request: _Sample) -> RowSampling:
        """This step's sampling inputs of one request; multi-token bad words ban per step."""
        output = request.seq.output_token_ids
        banned = tuple(
            ids[-1]
            for ids in request.bad_words
            if len(ids) > 1
            and len(output) >= len(ids) - 1
            and tuple(output[len(output) - len(ids) + 1 :]) == ids[:-1]
        )
        return RowSampling(request.params, request.seed, self._slot_of[request.seq.seq_id], banned)

    def _bad_word_token_ids(self, bad_words: list[str]) -> tuple[tuple[int, ...], ...]:
        """vLLM's rule: each word as encoded alone and, when that differs, after a space."""
        sequences: list[tuple[int, ...]] = []
        for word in bad_words:
            plain = tuple(self.tokenizer.encode(word.lstrip(), add_special_tokens=False))
            spaced = tuple(self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            sequences.append(plain)
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                sequences.append(spaced)
        return tuple(sequences)

    def _record_logprobs(self, request: _Sample, outputs: dict, row: int) -> None:
        logprob = float(outputs["token_logprob"][row])
        request.cumulative_logprob += logprob
        k = self._top_count(request.params.logprobs)
        if k is None:
            return
        entry = self._logprob_entry(
            int(outputs["tokens"][row]),
            logprob,
            int(outputs["token_rank"][row]),
            outputs["top_ids"][row, :k],
            outputs["top_logprobs"][row, :k],
        )
        request.logprobs.append(entry)

    def _logprob_entry(
        self, token: int, logprob: float, rank: int, top_ids: np.ndarray, top_values: np.ndarray
    ) -> dict[int, Logprob]:
        """vLLM's per-position dict: the chosen token first, then the top ones ranked 1..k."""
        entry = {token: Logprob(logprob, rank, self._decode_one(token))}
        for top_rank, (tid, value) in enumerate(zip(top_ids, top_values, strict=True), 1):
            entry.setdefault(int(tid), Logprob(float(value), top_rank, self._decode_one(int(tid))))
        return entry

    def _record_prompt_logprobs(self, plan, inputs, outputs: dict, by_seq: dict) -> None:
        for row, item in enumerate(plan.scheduled):
            sample = by_seq[item.seq.seq_id]
            k = self._top_count(sample.params.prompt_logprobs)
            if k is None:
                continue
            first = int(inputs.query_start_loc[row])
            prompt = item.seq.prompt_token_ids
            for j in range(item.num_new_tokens):
                position = item.start + j + 1  # the prompt token this logprob is for
                if position >= len(prompt):
                    break
                t = first + j
                sample.prompt_logprobs[position] = self._logprob_entry(
                    prompt[position],
                    float(outputs["prompt_logprob"][t]),
                    int(outputs["prompt_rank"][t]),
                    outputs["prompt_top_ids"][t, :k],
                    outputs["prompt_top_logprobs"][t, :k],
                )

    def _top_count(self, requested: int | None) -> int | None:
        return self.vocab_size if requested == -1 else requested

    def _decode_one(self, token_id: int) -> str:
        """A token's own text (Logprob.decoded_token), cached: logprobs=-1 asks for every one."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    def _check_stop(self, seq: Sequence, request: _Sample) -> bool:
        params = request.params
        token = seq.output_token_ids[-1]
        if not params.ignore_eos and token in self.eos_token_ids:
            self.scheduler[request.group].finish(seq, "stop")
        elif token in params.stop_token_ids:
            self.scheduler[request.group].finish(seq, "stop", stop_reason=token)
        elif (
            request.stop_matcher is not None
            and seq.num_output_tokens >= params.min_tokens
            and (stop := request.stop_matcher.update(seq.output_token_ids)) is not None
        ):
            self.scheduler[request.group].finish(seq, "stop", stop_reason=stop)
        elif seq.num_output_tokens >= seq.max_tokens:
            self.scheduler[request.group].finish(seq, "length")
        return seq.is_finished

    def _request_output(self, samples: list[_Sample]) -> RequestOutput:
        first = samples[0]
        return RequestOutput(
            request_id=first.request_id,
            prompt=first.prompt,
            prompt_token_ids=list(first.seq.prompt_token_ids),
            prompt_logprobs=self._prompt_logprobs(first),
            outputs=[self._completion(sample) for sample in samples],
            finished=all(sample.seq.is_finished for sample in samples),
        )

    def _prompt_logprobs(self, sample: _Sample) -> list[dict[int, Logprob] | None] | None:
        """vLLM's shape: one entry per prompt token, None for the first (nothing predicts it)."""
        if sample.params.prompt_logprobs is None:
            return None
        count = sample.seq.num_prompt_tokens
        return [None] + [sample.prompt_logprobs[p] for p in range(1, count)]

    def _completion(self, sample: _Sample) -> CompletionOutput:
        seq, params = sample.seq, sample.params
        if sample.stop_matcher is not None and sample.stop_matcher.matched is not None:
            text = sample.stop_matcher.text
        else:
            text = self.tokenizer.decode(
                seq.output_token_ids, skip_special_tokens=params.skip_special_tokens
            )
        return CompletionOutput(
            index=sample.index,
            text=text,
            token_ids=list(seq.output_token_ids),
            cumulative_logprob=sample.cumulative_logprob if params.logprobs is not None else None,
            logprobs=sample.logprobs if params.logprobs is not None else None,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )


def _as_config(config: EngineConfig | str | None, kwargs: dict) -> EngineConfig:
    """`Engine(config)`, `Engine(PATH, **fields)` or `Engine(model=PATH, **fields)`."""
    if config is None or isinstance(config, str):
        return EngineConfig(**({"model": config} if config else {}), **kwargs)
    return config.replace(**kwargs) if kwargs else config


def _build_mesh(config: EngineConfig, devices=None):
    """The device mesh of one replica (runtime/mesh.py), or None for the default device.

    Given `devices` (a data-parallel replica's group), even T == P == 1 gets a one-device mesh, so
    the replica's weights, KV cache and steps are committed to its own device."""
    if config.data_parallel_size > 1:  # Engine(...) builds a DataParallelEngine instead
        raise ValueError("one engine replica has data_parallel_size 1")
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


def _as_conversations(messages) -> list[list[dict]]:
    """One conversation (a list of {"role", "content"} dicts) or a list of them."""
    if not isinstance(messages, list | tuple) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    conversations = [messages] if isinstance(messages[0], dict) else list(messages)
    for i, conversation in enumerate(conversations):
        if not conversation or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in conversation
        ):
            raise ValueError(
                f"messages[{i}] must be a non-empty list of {{'role', 'content'}} dicts"
            )
    return conversations


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, str | dict):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int | np.integer) for t in prompts):
        return [prompts]  # one prompt given as token ids
    if not prompts:
        raise ValueError("prompts is empty: pass a str, a list of str, or token-id lists")
    return prompts


LLM = Engine
