"""Reproducible evaluation runs: a JSONL prompt set in, a JSONL results file out, byte for byte.

    run_eval("configs/seeded-eval.yaml", "prompts.jsonl", "results.jsonl")
    # or: jaxinfer eval --config configs/seeded-eval.yaml --prompts prompts.jsonl --out results.jsonl

Input, one JSON object per line: `"prompt": str` or `"messages": [{"role", "content"}, ...]` (run
through the chat template), an optional `"id"` (default: the request's position), and any
SamplingParams field (vLLM's names, `"seed"` among them) over the config's `sampling:` defaults.

Output: a header line (engine config, sha256 of the model files, jax/jaxlib/jaxinfer versions,
device kind), then one line per request and sample, in input order: the prompt, every sampling
parameter, the seed, the text, token ids, logprobs when asked, finish and stop reasons.

Why the file is the same byte for byte on a second run: a request without a seed gets one derived
from the engine seed and its id (not its position, so reordering the file changes nothing), each
request samples with its own key (DESIGN.md, principle 3), keys are sorted, floats are written
with 9 significant digits (exact for float32 logprobs), and nothing time- or host-dependent is
written. Sampled tokens do not depend on the batch a request ran in; logprobs may differ in the
last float32 bits between different batch compositions (sums over different shapes), so only a
rerun of the same file is promised to be byte-identical.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxinfer.config import EngineConfig
from jaxinfer.config_file import ConfigFile, load_config_file
from jaxinfer.llm import Engine
from jaxinfer.outputs import CompletionOutput, Logprob, RequestOutput
from jaxinfer.sampling_params import SamplingParams

FORMAT = "jaxinfer-eval/1"
PROMPT_KEYS = ("id", "prompt", "messages")
SAMPLING_KEYS = tuple(f.name for f in dataclasses.fields(SamplingParams))
# Files of a Hugging Face folder that can change what the model computes or how text is tokenized.
MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".gguf", ".model", ".txt", ".jinja", ".tiktoken")


@dataclass(frozen=True, kw_only=True)
class EvalRequest:
    """One input line, checked: exactly one of prompt / messages, and its own sampling fields."""

    id: int | str
    line: int  # 1-based line in the prompt file, for error messages
    prompt: str | None = None
    messages: list[dict] | None = None
    sampling: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class EvalResults:
    """What `run_eval` wrote: the header and sample records exactly as they are in the file."""

    path: Path
    header: dict
    samples: list[dict]


def run_eval(
    engine_or_config: Engine | EngineConfig | ConfigFile | str | os.PathLike,
    prompts_jsonl: str | os.PathLike | Iterable[Mapping],
    out_path: str | os.PathLike,
    *,
    sampling: Mapping[str, Any] | None = None,
    use_tqdm: bool = True,
) -> EvalResults:
    """Run every request of `prompts_jsonl` and write the results file `out_path`.

    `engine_or_config`: a running Engine (kept running), or an EngineConfig, a loaded ConfigFile
    or a YAML path (an engine is built for the run and shut down after it). Sampling fields
    stack, later ones winning: the engine's defaults (generation_config.json), the config file's
    `sampling:`, `sampling`, then each request's own fields.
    """
    requests = read_prompts(prompts_jsonl)  # a bad line fails before an engine is built
    engine, file_sampling, owned = _engine_for(engine_or_config)
    try:
        defaults = {
            **dataclasses.asdict(engine.get_default_sampling_params()),
            **file_sampling,
            **(sampling or {}),
        }
        resolved = [_request_params(engine.config.seed, defaults, r) for r in requests]
        # A rerun must be byte-identical: start from an empty prefix cache, so that which
        # prefixes are read back from cache (a ~1e-6 different float path) depends on this run
        # alone, not on what the engine served before.
        engine.reset_prefix_cache()
        outputs = _generate(engine, requests, [params for params, _ in resolved], use_tqdm)
        header = _jsonable(eval_header(engine, defaults, len(requests)))
    finally:
        if owned:
            engine.shutdown()
    samples = [
        _jsonable(_sample_record(request, params, derived, output, completion))
        for request, (params, derived), output in zip(requests, resolved, outputs, strict=True)
        for completion in output.outputs
    ]
    path = Path(out_path)
    _write_lines(path, [header, *samples])
    return EvalResults(path=path, header=header, samples=samples)


def derive_seed(engine_seed: int, request_id: int | str) -> int:
    """The seed of a request that names none: a uint32 from the engine seed and the request id.

    The id, not the position, so shuffling the prompt file leaves every request's samples as
    they were; sha256, so the value is the same on every machine and Python version.
    """
    digest = hashlib.sha256(json.dumps([engine_seed, request_id]).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def read_prompts(source: str | os.PathLike | Iterable[Mapping]) -> list[EvalRequest]:
    """Parse and check a JSONL prompt file (or the same objects as an iterable of dicts)."""
    if isinstance(source, str | os.PathLike):
        name = str(source)
        with open(source, encoding="utf-8") as stream:
            lines = [(n, line) for n, line in enumerate(stream, 1) if line.strip()]
        objects = []
        for n, line in lines:
            try:
                objects.append((n, json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"{name} line {n}: not valid JSON: {error}") from None
    else:
        name, objects = "prompts", list(enumerate(source, 1))
    requests, seen = [], {}
    for index, (n, obj) in enumerate(objects):
        request = _request(obj, index, f"{name} line {n}")
        if request.id in seen:
            raise ValueError(f"{name} line {n}: id {request.id!r} repeats line {seen[request.id]}")
        seen[request.id] = n
        requests.append(dataclasses.replace(request, line=n))
    if not requests:
        raise ValueError(f"{name}: no requests")
    return requests


def eval_header(engine: Engine, sampling_defaults: Mapping, num_requests: int) -> dict:
    """Everything a rerun has to match: config, model bytes, software versions, device."""
    import jax
    import jaxlib
    import numpy
    import transformers

    import jaxinfer

    return {
        "type": "header",
        "format": FORMAT,
        "engine_config": dataclasses.asdict(engine.config),
        "sampling_defaults": _params_record(sampling_defaults),
        "model_files": model_file_hashes(engine.config),
        "versions": {
            "jaxinfer": jaxinfer.__version__,
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "transformers": transformers.__version__,
            "numpy": numpy.__version__,
            "python": platform.python_version(),
        },
        "device": {
            "platform": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind,
            "device_count": jax.device_count(),
        },
        "num_requests": num_requests,
    }


def model_file_hashes(config: EngineConfig) -> dict[str, str]:
    """sha256 of each file the engine reads the model (and tokenizer) from, by file name."""
    from jaxinfer.models.loader import CheckpointSource

    source = CheckpointSource.resolve(
        config.model, config.gguf_file, revision=config.revision, download_dir=config.download_dir
    )
    if source.gguf_file is not None:
        files = {Path(source.gguf_file).name: Path(source.gguf_file)}
    else:
        files = _checkpoint_files(source.folder)
    if config.tokenizer is not None and Path(config.tokenizer).expanduser().is_dir():
        tokenizer = _checkpoint_files(Path(config.tokenizer).expanduser())
        files.update({f"tokenizer/{name}": path for name, path in tokenizer.items()})
    return {name: _sha256(path) for name, path in sorted(files.items())}


def dumps(record: Mapping) -> str:
    """One deterministic JSON line: sorted keys, no spaces, ASCII only, 9-digit floats."""
    return json.dumps(
        _jsonable(record), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


# ---- requests -----------------------------------------------------------------------------------


def _request(obj: object, index: int, where: str) -> EvalRequest:
    if not isinstance(obj, Mapping):
        raise ValueError(  # noqa: TRY004 (a bad line is a ValueError, whatever is wrong in it)
            f"{where}: expected a JSON object, got {type(obj).__name__}"
        )
    unknown = sorted(set(obj) - set(PROMPT_KEYS) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {unknown}; a line holds {', '.join(PROMPT_KEYS)} and "
            f"SamplingParams fields ({', '.join(SAMPLING_KEYS)})"
        )
    if ("prompt" in obj) == ("messages" in obj):
        raise ValueError(f"{where}: give exactly one of 'prompt' (a str) or 'messages' (chat)")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if prompt is not None and not (isinstance(prompt, str) and prompt):
        raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
    if "messages" in obj and not (
        isinstance(messages, list)
        and messages
        and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages)
    ):
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    request_id = obj.get("id", index)
    if isinstance(request_id, bool) or not isinstance(request_id, int | str):
        raise ValueError(  # noqa: TRY004 (as above)
            f"{where}: 'id' must be a string or an int, got {request_id!r}"
        )
    sampling = {k: v for k, v in obj.items() if k in SAMPLING_KEYS}
    if isinstance(sampling.get("logit_bias"), dict):  # JSON object keys are always strings
        sampling["logit_bias"] = {
            int(k) if isinstance(k, str) and k.isdigit() else k: v
            for k, v in sampling["logit_bias"].items()
        }
    try:
        SamplingParams(**sampling)  # fail on this line, not deep inside the run
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None
    return EvalRequest(id=request_id, line=0, prompt=prompt, messages=messages, sampling=sampling)


def _request_params(
    engine_seed: int, defaults: Mapping, request: EvalRequest
) -> tuple[SamplingParams, bool]:
    """The request's SamplingParams with a seed always set; True when the seed was derived."""
    try:
        params = SamplingParams(**{**defaults, **request.sampling})
    except (TypeError, ValueError) as error:
        raise ValueError(f"request {request.id!r} (line {request.line}): {error}") from None
    if params.seed is not None:
        return params, False
    return dataclasses.replace(params, seed=derive_seed(engine_seed, request.id)), True


def _engine_for(target) -> tuple[Engine, Mapping, bool]:
    """(engine, the config file's sampling defaults, whether this run owns the engine)."""
    if isinstance(target, Engine):
        return target, {}, False
    if isinstance(target, str | os.PathLike):
        target = load_config_file(target)
    if isinstance(target, ConfigFile):
        return Engine(target.engine), dict(target.sampling), True
    if isinstance(target, EngineConfig):
        return Engine(target), {}, True
    raise TypeError(
        "run_eval takes an Engine, an EngineConfig, a ConfigFile or a YAML path, "
        f"got {type(target).__name__}"
    )


def _generate(
    engine: Engine, requests: list[EvalRequest], params: list[SamplingParams], use_tqdm: bool
) -> list[RequestOutput]:
    """Plain prompts in one generate() call, conversations in one chat() call; input order."""
    outputs: list[RequestOutput | None] = [None] * len(requests)
    plain = [i for i, r in enumerate(requests) if r.messages is None]
    chats = [i for i, r in enumerate(requests) if r.messages is not None]
    if plain:
        results = engine.generate(
            [requests[i].prompt for i in plain], [params[i] for i in plain], use_tqdm=use_tqdm
        )
        for i, result in zip(plain, results, strict=True):
            outputs[i] = result
    if chats:
        results = engine.chat(
            [requests[i].messages for i in chats], [params[i] for i in chats], use_tqdm=use_tqdm
        )
        for i, result in zip(chats, results, strict=True):
            outputs[i] = result
    return outputs


# ---- records ------------------------------------------------------------------------------------


def _sample_record(
    request: EvalRequest,
    params: SamplingParams,
    seed_derived: bool,
    output: RequestOutput,
    completion: CompletionOutput,
) -> dict:
    return {
        "type": "sample",
        "id": request.id,
        "sample": completion.index,  # sample i of n draws with row_seed(seed, i)
        "prompt": output.prompt,  # for chat: the rendered template
        "messages": request.messages,
        "prompt_token_ids": output.prompt_token_ids,
        "sampling_params": _params_record(dataclasses.asdict(params)),
        "seed": params.seed,
        "seed_derived": seed_derived,
        "text": completion.text,
        "token_ids": completion.token_ids,
        "logprobs": _logprobs_record(completion.logprobs),
        "prompt_logprobs": _logprobs_record(output.prompt_logprobs),
        "cumulative_logprob": completion.cumulative_logprob,  # as vLLM: None unless logprobs
        "finish_reason": completion.finish_reason,
        "stop_reason": completion.stop_reason,
    }


def _params_record(params: Mapping) -> dict:
    """SamplingParams fields; logit_bias keys as strings (JSON object keys are strings)."""
    record = dict(params)
    if record.get("logit_bias") is not None:
        record["logit_bias"] = {str(k): v for k, v in sorted(record["logit_bias"].items())}
    return record


def _logprobs_record(positions: list[dict[int, Logprob] | None] | None) -> list | None:
    """vLLM's per-position dicts as lists in their order: the chosen token, then ranks 1..k."""
    if positions is None:
        return None
    return [
        None
        if entry is None
        else [
            {
                "token_id": token,
                "logprob": lp.logprob,
                "rank": lp.rank,
                "decoded_token": lp.decoded_token,
            }
            for token, lp in entry.items()
        ]
        for entry in positions
    ]


def _jsonable(value: Any) -> Any:
    """Plain JSON values: 9 significant digits per float, non-finite floats as strings."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)  # "inf", "-inf", "nan": JSON has no such numbers
        return float(format(value, ".9g"))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return _jsonable(value.item())
    raise TypeError(f"cannot write {type(value).__name__} to an eval results file")


def _write_lines(path: Path, records: list[dict]) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="ascii", newline="\n") as stream:
        stream.writelines(dumps(record) + "\n" for record in records)
    os.replace(partial, path)


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    return {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.suffix in MODEL_FILE_SUFFIXES
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
