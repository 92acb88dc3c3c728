"""lm-evaluation-harness's own `vllm` backend (lm_eval/models/vllm_causallms.py) running on
jaxinfer, against its `hf` backend (transformers, CPU float32) on the same tiny checkpoint.

`import vllm` resolves to tests/lm_eval_compat/vllm, which binds the names that backend imports
to jaxinfer's objects (LLM, SamplingParams, TokensPrompt; the engine's tokenizer loader); it is
on sys.path only while this module's fixture runs. The tasks are tests/lm_eval_tasks/*.yaml over
local jsonl files: multiple choice (loglikelihood), whole-text perplexity (loglikelihood_rolling)
and greedy generation (generate_until), so all three request kinds the backend has are compared.

Tolerance: per-sample loglikelihoods (|value| 4 to 180) differed by at most 7.6e-6 between the
two backends when measured (relative 5.7e-7, a few float32 eps); LL_TOL = 1e-4 is ~13x that.
Accuracies, is_greedy flags and generated texts must be equal: the closest pair of top choices
is 0.16 apart, far beyond the noise. (On this random checkpoint no continuation is the greedy one,
so every is_greedy is False; a prompt_logprobs that left out the top-1 entry would make them True.)
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from pathlib import Path

# conftest.py sets HF_HUB_OFFLINE; `datasets` reads its own switch when first imported (late,
# inside the fixtures), so the local json tasks never look for a hub.
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest
import yaml

HERE = Path(__file__).parent
ALIAS_ROOT = HERE / "lm_eval_compat"
TASK_DIR = HERE / "lm_eval_tasks"
TASKS = ("tiny_choice", "tiny_rolling", "tiny_greedy")
LL_TOL = 1e-4  # see the module docstring: ~13x the measured largest difference


def _task_config(name: str, cache_dir: Path) -> dict:
    """The task's YAML with its data file made absolute (datasets resolves relative paths
    against the working directory) and a private datasets cache."""
    config = yaml.safe_load((TASK_DIR / f"{name}.yaml").read_text())
    files = config["dataset_kwargs"]["data_files"]
    config["dataset_kwargs"]["data_files"] = {
        split: str(TASK_DIR / f) for split, f in files.items()
    }
    config["dataset_kwargs"]["cache_dir"] = str(cache_dir)
    return config


@pytest.fixture(scope="module")
def vllm_on_jaxinfer():
    """lm-eval's vllm backend module, imported with `vllm` resolved to jaxinfer; afterwards the
    alias leaves sys.path and sys.modules so no other test sees a `vllm` module."""
    sys.path.insert(0, str(ALIAS_ROOT))
    importlib.invalidate_caches()
    try:
        yield importlib.import_module("lm_eval.models.vllm_causallms")
    finally:
        sys.path.remove(str(ALIAS_ROOT))
        for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
            del sys.modules[name]
        sys.modules.pop("lm_eval.models.vllm_causallms", None)
        importlib.invalidate_caches()


@pytest.fixture(scope="module")
def both_backends(vllm_on_jaxinfer, tiny_llama, tmp_path_factory):
    """{backend: simple_evaluate's result} for the three tasks, one model per backend. Neither
    gets a max length: lm-eval reads it from the engine (`llm_engine.model_config.max_model_len`,
    the checkpoint's 512) and from the config's max_position_embeddings (512) respectively."""
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    import jaxinfer

    # The tasks are inline configs: no need to index lm-eval's ~14k built-in YAMLs (~6 s each).
    task_manager = TaskManager(include_defaults=False)
    cache_dir = tmp_path_factory.mktemp("datasets-cache")
    tasks = [_task_config(name, cache_dir) for name in TASKS]
    model_args = {
        "vllm": f"pretrained={tiny_llama},dtype=float32,num_kv_blocks=40",
        "hf": f"pretrained={tiny_llama},dtype=float32,device=cpu",
    }
    results = {}
    for backend, args in model_args.items():
        lm = get_model(backend).create_from_arg_string(args, {"batch_size": 8})
        if backend == "vllm":
            assert isinstance(lm, vllm_on_jaxinfer.VLLM) and isinstance(lm.model, jaxinfer.LLM)
            assert lm.max_length == 512
        try:
            results[backend] = simple_evaluate(
                model=lm, tasks=tasks, task_manager=task_manager, log_samples=True
            )
        finally:
            if backend == "vllm":
                lm.model.shutdown()
    return results


def _samples(results: dict, task: str) -> list[dict]:
    return sorted(results["samples"][task], key=lambda sample: sample["doc_id"])


def test_multiple_choice_matches_hf_backend(both_backends):
    task = "jaxinfer_tiny_choice"
    ours, theirs = (_samples(both_backends[b], task) for b in ("vllm", "hf"))
    assert len(ours) == len(theirs) == 8
    for mine, ref in zip(ours, theirs, strict=True):
        assert mine["arguments"] == ref["arguments"]  # the same contexts and continuations
        assert mine["acc"] == ref["acc"] and mine["acc_norm"] == ref["acc_norm"]
        for (ll, is_greedy), (ref_ll, ref_is_greedy) in zip(
            [r[0] for r in mine["resps"]], [r[0] for r in ref["resps"]], strict=True
        ):
            assert ll == pytest.approx(ref_ll, abs=LL_TOL)
            assert is_greedy == ref_is_greedy
    mine, ref = both_backends["vllm"]["results"][task], both_backends["hf"]["results"][task]
    assert mine["acc,none"] == ref["acc,none"] and mine["acc_norm,none"] == ref["acc_norm,none"]


def test_rolling_loglikelihood_and_perplexities_match_hf_backend(both_backends):
    task = "jaxinfer_tiny_rolling"
    ours, theirs = (_samples(both_backends[b], task) for b in ("vllm", "hf"))
    assert len(ours) == len(theirs) == 4
    for mine, ref in zip(ours, theirs, strict=True):
        assert mine["resps"][0][0] == pytest.approx(ref["resps"][0][0], abs=LL_TOL)
    # The aggregates are functions of s = (sum of the 4 loglikelihoods) / n, n (words or bytes)
    # >= 1, so s moves by at most 4 * LL_TOL: perplexity exp(-s) by a factor expm1(4 * LL_TOL),
    # bits per byte -s / ln 2 by 4 * LL_TOL / ln 2.
    mine, ref = both_backends["vllm"]["results"][task], both_backends["hf"]["results"][task]
    for metric in ("word_perplexity,none", "byte_perplexity,none"):
        assert math.isclose(mine[metric], ref[metric], rel_tol=math.expm1(4 * LL_TOL)), metric
    bpb = "bits_per_byte,none"
    assert math.isclose(mine[bpb], ref[bpb], rel_tol=0, abs_tol=4 * LL_TOL / math.log(2))


def test_greedy_generation_matches_hf_backend(both_backends):
    task = "jaxinfer_tiny_greedy"
    ours, theirs = (_samples(both_backends[b], task) for b in ("vllm", "hf"))
    assert len(ours) == len(theirs) == 4
    for mine, ref in zip(ours, theirs, strict=True):
        assert mine["arguments"] == ref["arguments"]
        assert mine["resps"] == ref["resps"] and mine["resps"][0][0]  # same, non-empty text
    mine, ref = both_backends["vllm"]["results"][task], both_backends["hf"]["results"][task]
    assert mine["exact_match,none"] == ref["exact_match,none"]
