#!/usr/bin/env bash
# The GPU check, one command on a CUDA machine with no network (about 9 minutes on one H100 80GB):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # OUT_DIR defaults to $OUT, else ./gpu-check
#
# in order of importance, each part under its own time limit so that one hang cannot eat the others:
#   1. benchmarks/qlora_steps.py: real-size steps of recipes/qwen2.5-7b-instruct-qlora.yaml (Qwen2.5-7B config,
#      random 4-bit weights): plain (lambda_set=0), the recipe, each answer_order mode: peak memory, tokens/s, ratios;
#   2. benchmarks/run.py --gpu: the loss alone at B=8, T=2048, V=128256 and 151936 (bf16 logits; the naive
#      reference's backward is skipped: minutes per call) and the 4-bit training step of a Llama-3.1-8B config;
#   3. the same as 1 for recipes/qwen2.5-72b-instruct-qlora.yaml (the recipe, then plain: one measured step each), if
#      the time left allows.
# Wheels missing on the machine (trl, bitsandbytes, datasets, ...) are installed from .whl/ if that folder exists.
# Writes OUT_DIR/{log, env.txt, qlora-7b.json, qlora-7b.md, run-gpu.md, qlora-72b.json, qlora-72b.md} and prints the
# tables last. Environment: GPU_CHECK_BUDGET_S (default 560) bounds the whole script's wall time;
# GPU_CHECK_TINY=1 runs every part at tiny sizes on the CPU (a smoke run of this script, about 2 minutes).
set -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${1:-${OUT:-$ROOT/gpu-check}}"
mkdir -p "$OUT_DIR"
BUDGET_S="${GPU_CHECK_BUDGET_S:-560}"
START_S=$SECONDS
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export WANDB_DISABLED=true

if compgen -G ".whl/*.whl" >/dev/null; then
    if "$PYTHON" -m pip --version >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl 2>&1 | tail -3
    else  # an environment without pip: a wheel is a zip of the files to install
        "$PYTHON" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall("/tmp/site") for w in sys.argv[1:]]' .whl/*.whl
    fi
    export PYTHONPATH="/tmp/site:$ROOT"
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

# Seconds left for a part: at most $1, and never past the script's budget (minus 10 s to print the tables).
limit() {
    local left=$((BUDGET_S - (SECONDS - START_S) - 10))
    ((left < $1)) && echo "$left" || echo "$1"
}

part() {  # part NAME CAP_S COMMAND...: run COMMAND under `timeout`, logging its start, end and exit status
    local name=$1 cap
    cap=$(limit "$2")
    shift 2
    if ((cap < 30)); then
        echo "== $name: not run, ${cap} s left of the ${BUDGET_S} s budget" | tee -a "$OUT_DIR/notes.txt"
        return 0
    fi
    echo "== $name: start at $((SECONDS - START_S)) s, limit $cap s"
    timeout --kill-after=10 "$cap" "$@"
    local rc=$?
    echo "== $name: exit $rc at $((SECONDS - START_S)) s$( ((rc == 124 || rc == 137)) && echo ' (time limit)')"
    ((rc == 124 || rc == 137)) && echo "== $name: stopped at its time limit ($cap s)" >>"$OUT_DIR/notes.txt"
    return 0
}

if [[ -n "${GPU_CHECK_TINY:-}" ]]; then
    STEPS_SIZE=(--tiny --device cpu)
    RUN_PY_MODE=(--check-gpu-path)
else
    STEPS_SIZE=()
    RUN_PY_MODE=(--gpu --naive-backward-max-mib 0)
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PYTHON" -c "import os, torch, transformers, trl, peft, bitsandbytes, accelerate, datasets, trl_qaloss; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__, '| bitsandbytes', bitsandbytes.__version__, '| accelerate', accelerate.__version__, '| datasets', datasets.__version__, '| trl_qaloss from', os.path.dirname(trl_qaloss.__file__), '|', os.cpu_count(), 'CPUs')"
    free -g | head -2
    # Triton (TRL's fused LM head, the plain SFTTrainer path) builds its launcher with the host C compiler.
    echo "C compiler: $(command -v "${CC:-cc}" gcc clang 2>/dev/null | head -1 || true)"
} 2>&1 | tee "$OUT_DIR/env.txt"

{
    part "7B QLoRA steps" 300 "$PYTHON" benchmarks/qlora_steps.py \
        --recipe recipes/qwen2.5-7b-instruct-qlora.yaml --model-config benchmarks/configs/qwen2.5-7b.json \
        --warmup 1 --steps 3 --time-budget 270 --out "$OUT_DIR/qlora-7b.json" "${STEPS_SIZE[@]}"
    part "run.py --gpu" 130 "$PYTHON" benchmarks/run.py "${RUN_PY_MODE[@]}" --output "$OUT_DIR/run-gpu.md"
    part "72B QLoRA steps" 200 "$PYTHON" benchmarks/qlora_steps.py \
        --recipe recipes/qwen2.5-72b-instruct-qlora.yaml --model-config benchmarks/configs/qwen2.5-72b.json \
        --runs recipe,plain --warmup 1 --steps 1 --time-budget 150 --out "$OUT_DIR/qlora-72b.json" "${STEPS_SIZE[@]}"
} 2>&1 | tee "$OUT_DIR/log"

echo
echo "==================== results ($((SECONDS - START_S)) s in all) ===================="
for table in run-gpu.md qlora-72b.md qlora-7b.md; do
    [[ -f "$OUT_DIR/$table" ]] && { echo; cat "$OUT_DIR/$table"; } || echo "$table: not written (see log)"
done
[[ -f "$OUT_DIR/notes.txt" ]] && cat "$OUT_DIR/notes.txt"
exit 0
