#!/usr/bin/env bash
# The GPU suite (issue 13): every GPU figure of vitlens in one run that fits one device lease.
#
#   bash benchmarks/gpu_suite.sh              on the GPU machine; writes $OUT/gpu_suite.json and $OUT/gpu_suite.log
#   bash benchmarks/gpu_suite.sh --dry-run    on any machine: CPU, tiny sizes, every part (CI runs this)
#   bash benchmarks/gpu_suite.sh --stage      here, before the device call: copy the real data into
#                                             .gpudata/ (git-ignored) so that `carry: [".gpudata"]` takes it
#                                             (already there in this checkout: cifar10, multi30k, tinyshakespeare)
#
# Other flags go to benchmarks/gpu_suite.py (--parts setup,throughput,..., --budget-s, --data DIR).
# The device machine has python3 with torch, torchvision, timm, sacrebleu, tokenizers, safetensors,
# pyyaml, tensorboard and matplotlib already; vitlens itself runs from src/ (PYTHONPATH), nothing is
# installed. Data: $VITLENS_SUITE_DATA, ./shared/data, ../shared/data or ./.gpudata, first found.
# Device call (lead): run(command="bash benchmarks/gpu_suite.sh", carry=[".gpudata"], timeout_s=590)
# It keeps to 520 s of its own (--budget-s) and is killed at 540 s (9 min) at the latest; the JSON is
# rewritten after every part, so whatever ran is kept.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if [[ "${1:-}" == "--stage" ]]; then
    src="${VITLENS_SUITE_DATA:-../shared/data}"
    mkdir -p .gpudata
    for d in cifar10 multi30k tinyshakespeare; do [[ -d .gpudata/$d ]] || cp -r "$src/$d" .gpudata/; done
    if [[ -d .git ]] && ! grep -qx '/.gpudata/' .git/info/exclude 2>/dev/null; then
        mkdir -p .git/info && echo '/.gpudata/' >> .git/info/exclude
    fi
    du -sh .gpudata
    exit 0
fi

OUT="${OUT:-out/gpu_suite}"
mkdir -p "$OUT"
if [[ " $* " != *" --dry-run "* ]] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv > "$OUT/nvidia_smi.csv" 2>&1
fi
# One wall-clock guard above the driver's own budget, so the device call always returns with the JSON.
limit=540
[[ " $* " == *" --dry-run "* ]] && limit=1500  # a slow CI runner, not the lease, bounds the dry run
exec timeout -k 5 "$limit" "$PYTHON" benchmarks/gpu_suite.py --out "$OUT" "$@"
