"""ModelRunner: the only place that holds device arrays and calls compiled code.

Each bucket is compiled ahead of time (`jit(...).lower(...).compile()`) and kept in a table, so a
shape that was never compiled cannot slip through as a silent retrace: it shows up as a compile
counted by `num_compilations`, which tests watch. Each step is three or four executables: the
forward pass to the logits (reads the cache; per bucket), the sampler (per sequence count), the
prompt scorer (per token count, only in steps where some request wants prompt logprobs) and the
cache writer (donates the cache; per token count), see `runtime/step.py`. Multi-step decode runs
one more per decode bucket, several steps of all of them in a loop (`runtime/multi_step.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxinfer.interrupts import deferred_interrupts
from jaxinfer.models.loader import LoadedModel
from jaxinfer.runtime import kv_cache as kv
from jaxinfer.runtime import multi_step
from jaxinfer.runtime import slot_state as slots
from jaxinfer.runtime.attention_backend import attention_fn, resolve_backend
from jaxinfer.runtime.mesh import replicated
from jaxinfer.runtime.pipeline import StageLayout, StageState, hidden_sharding
from jaxinfer.runtime.program_cache import ProgramCache, compile_concurrently
from jaxinfer.runtime.sampling_tensors import SamplingRow, build_sampling_tensors
from jaxinfer.runtime.seam_pytrees import abstract_inputs
from jaxinfer.runtime.step import (
    SamplerPrograms,
    all_token_logits,
    jit_copy_blocks,
    jit_stage_forward,
    jit_step,
    jit_write_cache,
    no_prompt_logprobs,
    prompt_logprobs,
    sample_rows,
    sampler_inputs,
    splice_tokens,
)
from jaxinfer.seam import Bucket, StepInputs, StepOutputs

logger = logging.getLogger("jaxinfer")


class ModelRunner:
    def __init__(
        self,
        model: LoadedModel,
        num_blocks: int,
        block_size: int,
        *,
        num_slots: int,
        num_logprobs: int,
        max_top_k: int = 256,
        attention_backend: str = "auto",
        mesh: Mesh | None = None,
        batch_invariant: bool = False,
        kv_cache_dtype=None,  # default: the model's dtype
    ) -> None:
        self.model = model
        self.kv_cache_dtype = jnp.dtype(model.dtype if kv_cache_dtype is None else kv_cache_dtype)
        self.mesh = mesh
        cfg = model.model_config
        self.attention_backend = (
            "batch_invariant"
            if batch_invariant
            else resolve_backend(attention_backend, cfg.head_dim)
        )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_logprobs = num_logprobs
        self.max_block_copies = num_slots  # at most one copy-on-write per decoding sequence
        layout = StageLayout.build(
            mesh, cfg.num_layers, model.family.EMBED_PARAMS, model.layer_partition
        )
        stage_params = layout.stage_params(model.params, cfg.tie_word_embeddings)
        self.stages: list[StageState] = []
        for stage_mesh, layers, params in zip(layout.meshes, layout.ranges, stage_params):
            static = {
                "family": model.family,
                "model_config": cfg,
                "paged_attention": attention_fn(
                    self.attention_backend, stage_mesh, self.kv_cache_dtype
                ),
                "mesh": stage_mesh,
                "first_layer": layers.start,
                "batch_invariant": batch_invariant,
            }
            jit = jit_step if layers.stop == cfg.num_layers else jit_stage_forward
            jitted = functools.partial(jit, **static)
            stage_cfg = dataclasses.replace(cfg, num_layers=len(layers))
            cache = kv.allocate(stage_cfg, num_blocks, block_size, self.kv_cache_dtype, stage_mesh)
            self.stages.append(StageState(stage_mesh, layers, params, cache, jitted, static))
        last = self.stages[-1]
        self.slot_state = slots.allocate(num_slots, cfg.vocab_size)
        if last.mesh is not None:  # small [slots, V] arrays: every device keeps all of them
            self.slot_state = jax.device_put(self.slot_state, replicated(last.mesh))
        self._write_slot = jax.jit(slots.write_slot, donate_argnums=(0,))
        self._sampler_static = {
            "max_top_k": max_top_k,
            "num_logprobs": num_logprobs,
            # a data-parallel replica may have a mesh of 1
            "topk_barrier": last.mesh is None or last.mesh.size == 1,
            "batch_invariant": batch_invariant,
        }
        self._sample_rows = jax.jit(functools.partial(sample_rows, **self._sampler_static))
        self._gather_rows = jax.jit(slots.gather_rows)
        self._count_sampled = jax.jit(slots.count_sampled, donate_argnums=(0,))
        self._prompt_logprobs = jax.jit(
            functools.partial(
                prompt_logprobs,
                family=model.family,
                model_config=cfg,
                num_logprobs=num_logprobs,
                mesh=last.mesh,
                batch_invariant=batch_invariant,
            )
        )
        # (decode bucket, max steps) -> the multi-step decode program (runtime/multi_step.py)
        self._multi_step: dict[tuple[Bucket, int], jax.stages.Compiled] = {}
        self._samplers: dict[int, SamplerPrograms] = {}  # sequence count -> its programs
        self._prompt_scorers: dict[int, jax.stages.Compiled] = {}  # token count -> scorer
        self._all_logits = jax.jit(
            functools.partial(
                all_token_logits,
                family=model.family,
                model_config=cfg,
                paged_attention=last.static["paged_attention"],
                first_layer=last.layers.start,
                batch_invariant=batch_invariant,
            )
        )
        self._splices: dict[tuple[int, int], jax.stages.Compiled] = {}
        self._block_copiers: dict[int, jax.stages.Compiled] = {}  # stage index -> its copier
        # Told what is about to compile, so a waiting user sees why (the progress bar sets it).
        self.compile_listener: Callable[[str], None] | None = None
        self._programs = ProgramCache(self._announce)

    @property
    def num_compilations(self) -> int:
        return self._programs.num_compilations

    @property
    def compile_seconds(self) -> float:
        """Summed over programs: more than the wall time where a warm-up overlapped them."""
        return self._programs.compile_seconds

    @staticmethod
    def compile_concurrently(jobs: list[Callable[[], object]]) -> None:
        """Run compile jobs (this runner's `compile*` calls) on a few threads: the warm-up."""
        compile_concurrently(jobs)

    @property
    def kv_cache(self) -> tuple:
        """Every layer's (k, v) cache, in layer order, wherever its stage keeps it."""
        return tuple(layer for stage in self.stages for layer in stage.kv_cache)

    def _announce(self, what: str) -> None:
        logger.info("compiling %s (first use of this shape; cached for later runs)", what)
        if self.compile_listener is not None:
            self.compile_listener(what)

    def _new_kv_shapes(self, stage: StageState, num_tokens: int) -> tuple:
        cfg = self.model.model_config
        new = jax.ShapeDtypeStruct((num_tokens, cfg.num_kv_heads, cfg.head_dim), self.model.dtype)
        return tuple((new, new) for _ in stage.layers)

    def compile(self, bucket: Bucket, *, prompt_logprobs: bool = True) -> None:
        """Every program a step of `bucket` runs, compiling whichever is new: each stage's forward
        pass and cache writer, the sampler and (unless `prompt_logprobs` is False: a step where no
        request wants them) the prompt scorer. `warmup()` compiles them all."""
        last = self.stages[-1]
        if (
            all(bucket in s.executables and bucket.num_tokens in s.writers for s in self.stages)
            and bucket.num_seqs in self._samplers
            and (not prompt_logprobs or self._has_prompt_scorer(bucket))
        ):
            return  # every step after warm-up
        hidden = None  # the first stage embeds; the others take the previous stage's output
        for index, stage in enumerate(self.stages):
            executable = self._programs.get(
                stage.executables,
                bucket,
                bucket.describe(),
                functools.partial(self._compile_forward, stage, bucket, hidden),
            )
            if stage is not last:
                out = executable.out_info[0]
                hidden = jax.ShapeDtypeStruct(
                    out.shape, out.dtype, sharding=hidden_sharding(self.stages[index + 1].mesh)
                )
            self._programs.get(
                stage.writers,
                bucket.num_tokens,
                f"the cache writer for {bucket.num_tokens} tokens",
                functools.partial(self._compile_writer, stage, bucket.num_tokens),
            )
        self._programs.get(
            self._samplers,
            bucket.num_seqs,
            f"the sampler for {bucket.num_seqs} sequences",
            functools.partial(self._compile_sampler, last.executables[bucket], bucket),
        )
        if prompt_logprobs and bucket.is_prefill:
            self._prompt_scorer(bucket)

    def _abstract_inputs(self, bucket: Bucket, stage: StageState) -> StepInputs:
        """The step's inputs as shapes, replicated over the stage's mesh (for lowering)."""
        sharding = None if stage.mesh is None else replicated(stage.mesh)
        return abstract_inputs(bucket, sharding, vocab_size=self.model.model_config.vocab_size)

    def _compile_forward(self, stage: StageState, bucket: Bucket, hidden) -> jax.stages.Compiled:
        inputs = self._abstract_inputs(bucket, stage)
        jitted = stage.jit(decode_rows=bucket.decode_rows)
        return jitted.lower(stage.params, stage.kv_cache, inputs, hidden).compile()

    def _compile_writer(self, stage: StageState, num_tokens: int) -> jax.stages.Compiled:
        slot_mapping = jax.ShapeDtypeStruct((num_tokens,), jnp.int32)
        new_kv = self._new_kv_shapes(stage, num_tokens)
        lowered = jit_write_cache.lower(
            stage.kv_cache, new_kv, slot_mapping, cache_dtype=self.kv_cache_dtype
        )
        return lowered.compile()

    def _compile_sampler(self, forward: jax.stages.Compiled, bucket: Bucket) -> SamplerPrograms:
        inputs = self._abstract_inputs(bucket, self.stages[-1])
        gather = self._gather_rows.lower(self.slot_state, inputs.slots, inputs.banned).compile()
        sample = self._sample_rows.lower(
            forward.out_info[0], gather.out_info, sampler_inputs(inputs)
        ).compile()
        count = self._count_sampled.lower(
            self.slot_state, inputs.slots, sample.out_info["tokens"], inputs.sampled
        ).compile()
        return SamplerPrograms(gather=gather, sample=sample, count=count)

    def _has_prompt_scorer(self, bucket: Bucket) -> bool:
        """Decode-only buckets score no prompt tokens, so they need none."""
        return not bucket.is_prefill or bucket.num_tokens in self._prompt_scorers

    def _prompt_scorer(self, bucket: Bucket) -> jax.stages.Compiled:
        """The prompt scorer for the bucket's token count, compiled on first need (after the
        bucket's forward program, whose hidden-state output it takes)."""
        last = self.stages[-1]

        def build() -> jax.stages.Compiled:
            hidden_info = last.executables[bucket].out_info[1]
            sharding = None if last.mesh is None else replicated(last.mesh)
            next_ids = jax.ShapeDtypeStruct((bucket.num_tokens,), jnp.int32, sharding=sharding)
            return self._prompt_logprobs.lower(last.params, hidden_info, next_ids).compile()

        what = f"the prompt-logprob scorer for {bucket.num_tokens} tokens"
        return self._programs.get(self._prompt_scorers, bucket.num_tokens, what, build)

    def compile_token_splice(self, num_tokens: int, num_previous: int):
        """The tiny program that feeds a step the tokens its predecessor is still computing
        (async scheduling): token_ids[t] = previous[index[t]] where index[t] >= 0."""
        i32 = jnp.int32

        def build() -> jax.stages.Compiled:
            return (
                jax.jit(splice_tokens)
                .lower(
                    jax.ShapeDtypeStruct((num_tokens,), i32),
                    jax.ShapeDtypeStruct((num_previous,), i32),
                    jax.ShapeDtypeStruct((num_tokens,), i32),
                )
                .compile()
            )

        what = f"the token splice {num_previous} -> {num_tokens}"
        return self._programs.get(self._splices, (num_tokens, num_previous), what, build)

    def compile_multi_step(self, bucket: Bucket, max_steps: int) -> jax.stages.Compiled:
        """The program that runs up to `max_steps` decode steps of a decode `bucket` in one call
        (runtime/multi_step.py); one stage only. Donates the cache and the slot state."""
        if len(self.stages) != 1 or bucket.is_prefill:
            raise ValueError("multi-step decode runs decode buckets on a single stage")
        stage = self.stages[0]

        def build() -> jax.stages.Compiled:
            return multi_step.compile_decode_steps(
                stage.params,
                stage.kv_cache,
                self.slot_state,
                self._abstract_inputs(bucket, stage),
                step_static=dict(stage.static, decode_rows=bucket.num_seqs),
                sampler_static=self._sampler_static,
                block_size=self.block_size,
                max_steps=max_steps,
                cache_dtype=self.kv_cache_dtype,
            )

        what = f"{max_steps} decode steps for {bucket.num_seqs} sequences"
        return self._programs.get(self._multi_step, (bucket, max_steps), what, build)

    def dispatch_multi_step(
        self, bucket: Bucket, inputs: StepInputs, num_steps: int, max_steps: int
    ) -> tuple[StepOutputs, jax.Array]:
        """Start up to `num_steps` decode steps from `inputs` in one call; -> (StepOutputs whose
        per-row fields are stacked [max_steps, S, ...], the count of steps run), on the device.
        Every block the steps write into must already be in `inputs.block_tables`."""
        program = self.compile_multi_step(bucket, max_steps)
        stage = self.stages[0]
        with deferred_interrupts():  # donates the cache and the slot state
            stage.kv_cache, self.slot_state, per_row, steps_run = program(
                stage.params, stage.kv_cache, self.slot_state, inputs, np.int32(num_steps)
            )
        per_token = no_prompt_logprobs(bucket.num_tokens, self.num_logprobs)
        return StepOutputs(**per_row, **per_token), steps_run

    def compile_block_copier(self) -> None:
        pairs = jax.ShapeDtypeStruct((self.max_block_copies,), jnp.int32)
        for index, stage in enumerate(self.stages):
            self._programs.get(
                self._block_copiers,
                index,
                "the block copier",
                lambda stage=stage: jit_copy_blocks.lower(stage.kv_cache, pairs, pairs).compile(),
            )

    def copy_blocks(self, copies: tuple[tuple[int, int], ...]) -> None:
        """Copy KV blocks (src, dst) in order; copy-on-write of shared blocks before a step."""
        if not copies:
            return
        if len(copies) > self.max_block_copies:
            raise ValueError(f"{len(copies)} block copies exceed {self.max_block_copies}")
        pairs = np.zeros((2, self.max_block_copies), np.int32)
        pairs[:, : len(copies)] = np.asarray(copies, np.int32).T
        self.compile_block_copier()
        with deferred_interrupts():  # donates the cache: see jaxinfer/interrupts.py
            for index, stage in enumerate(self.stages):
                copier = self._block_copiers[index]
                stage.kv_cache = copier(stage.kv_cache, pairs[0], pairs[1])

    def write_slot(self, slot: int, row: slots.SlotState) -> None:
        """Install one request's sampling row (host arrays [V]) in its slot."""
        with deferred_interrupts():  # donates the slot state: see jaxinfer/interrupts.py
            self.slot_state = self._write_slot(self.slot_state, np.int32(slot), row)

    def install_sampling_row(
        self,
        slot: int,
        *,
        params,
        seed: int,
        prompt_token_ids: list[int],
        output_token_ids: list[int],
        eos_token_ids: list[int],
        banned_token_ids: list[int],
    ) -> None:
        """Build one request's [V]-wide sampling row on the host and install it in `slot`; on
        re-admission after preemption the output so far rebuilds its penalty counts."""
        row = SamplingRow(
            params=params,
            seed=seed,
            prompt_token_ids=prompt_token_ids,
            output_token_ids=output_token_ids,
            eos_token_ids=eos_token_ids,
            banned_token_ids=banned_token_ids,
        )
        vocab_size = self.model.model_config.vocab_size
        self.write_slot(slot, slots.row_of(build_sampling_tensors([row], vocab_size)))

    def _run_stage(self, index: int, bucket: Bucket, arrays: StepInputs, hidden: jax.Array | None):
        """Stage `index`'s share of a step: its executable, then its K/V write; on the last stage
        the sampler and, where some token asked, the prompt scorer. -> the last stage's outputs,
        or this stage's hidden states already on the next stage's devices."""
        stage = self.stages[index]
        last = index == len(self.stages) - 1
        # The sampler's count program donates the slot state and the writer the cache: each call
        # and the store of what it returns must not be split by a KeyboardInterrupt
        # (jaxinfer/interrupts.py).
        with deferred_interrupts():
            if last:
                logits, result, new_kv = stage.executables[bucket](
                    stage.params, stage.kv_cache, arrays, hidden
                )
            else:
                result, new_kv = stage.executables[bucket](
                    stage.params, stage.kv_cache, arrays, hidden
                )
            stage.kv_cache = stage.writers[bucket.num_tokens](
                stage.kv_cache, new_kv, arrays.slot_mapping
            )
            if last:
                sampler = self._samplers[bucket.num_seqs]
                slot_rows = sampler.gather(self.slot_state, arrays.slots, arrays.banned)
                per_row = sampler.sample(logits, slot_rows, sampler_inputs(arrays))
                self.slot_state = sampler.count(
                    self.slot_state, arrays.slots, per_row["tokens"], arrays.sampled
                )
        if not last:
            return jax.device_put(result, hidden_sharding(self.stages[index + 1].mesh))
        if self._wants_prompt_logprobs(bucket, arrays):
            scorer = self._prompt_scorer(bucket)
            per_token = scorer(stage.params, result, arrays.prompt_next_ids)
        else:
            per_token = no_prompt_logprobs(bucket.num_tokens, self.num_logprobs)
        return StepOutputs(**per_row, **per_token)

    def _wants_prompt_logprobs(self, bucket: Bucket, inputs: StepInputs) -> bool:
        """Does some token of this step want its prompt logprob? (`prompt_next_ids` is a host
        array: vocab_size where not.)"""
        if not bucket.is_prefill:
            return False
        return bool(np.any(inputs.prompt_next_ids < self.model.model_config.vocab_size))

    def _through_stages(self, bucket: Bucket, arrays: StepInputs) -> jax.Array | None:
        """Run every stage but the last; -> the hidden states the last stage takes, already on
        its devices (None without pipelining). The prompt scorer, if this step needs one and it
        is new, compiles when the last stage asks for it."""
        self.compile(bucket, prompt_logprobs=False)
        hidden = None
        for index in range(len(self.stages) - 1):
            hidden = self._run_stage(index, bucket, arrays, hidden)
        return hidden

    def execute(self, bucket: Bucket, inputs: StepInputs) -> StepOutputs:
        """Run one step; -> its outputs (see `step`) on the host. Cache and slots stay on device."""
        return self.collect(self.dispatch(bucket, inputs))

    def dispatch(
        self,
        bucket: Bucket,
        inputs: StepInputs,
        previous: tuple[StepOutputs, np.ndarray] | None = None,
    ) -> StepOutputs:
        """Start one step through every stage; -> its outputs, still on the device.

        Nothing waits here: JAX runs each stage's work asynchronously on that stage's devices, so
        with several batches dispatched before any is collected, stage s works on batch b + 1
        while stage s + 1 works on batch b (the engine keeps one batch in flight per scheduler).
        """
        if previous is not None:  # async scheduling: some rows' tokens are still on the device
            outputs, index = previous  # index[t]: the row of `outputs` holding token t, or -1
            splice = self.compile_token_splice(bucket.num_tokens, outputs.tokens.shape[0])
            inputs = inputs.replace(token_ids=splice(inputs.token_ids, outputs.tokens, index))
        hidden = self._through_stages(bucket, inputs)
        return self._run_stage(len(self.stages) - 1, bucket, inputs, hidden)

    @staticmethod
    def collect(outputs: StepOutputs) -> StepOutputs:
        """A dispatched step's outputs on the host (waits for that step only)."""
        return jax.tree.map(np.asarray, outputs)

    def stage_seconds(self, bucket: Bucket, inputs: StepInputs) -> list[float]:
        """Each stage's share of one batch (its executable, its K/V write), run alone and waited
        for: the work a pipeline has to overlap (benchmarks/parallel.py measures the bubble
        with it). Leaves the sampling state alone, like `all_logits`."""
        self.compile(bucket)
        arrays = inputs.replace(sampled=np.zeros_like(inputs.sampled))
        hidden, seconds = None, []
        for index, stage in enumerate(self.stages):
            started = time.perf_counter()
            hidden = self._run_stage(index, bucket, arrays, hidden)
            jax.block_until_ready((hidden, stage.kv_cache))
            seconds.append(time.perf_counter() - started)
        return seconds

    def all_logits(self, bucket: Bucket, inputs: StepInputs) -> np.ndarray:
        """Logits of every token of a prefill step [T, V], writing its K/V like `execute`.

        Outside the bucket contract (jitted on demand): for parity checks and diagnostics.
        """
        arrays = inputs.replace(sampled=np.zeros_like(inputs.sampled))  # leave the slots alone
        hidden = self._through_stages(bucket, arrays)
        last = self.stages[-1]
        logits = self._all_logits(last.params, last.kv_cache, arrays, hidden)
        self._run_stage(len(self.stages) - 1, bucket, arrays, hidden)
        return np.asarray(logits)

    def shutdown(self) -> None:
        for stage in self.stages:
            stage.executables.clear()
            stage.writers.clear()
            stage.kv_cache = None
        self._samplers.clear()
        self._prompt_scorers.clear()
        self._multi_step.clear()
        self.slot_state = None
