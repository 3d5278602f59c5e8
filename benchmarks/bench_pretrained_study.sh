#!/usr/bin/env bash
# The issue-11 bar: `vitlens study --preset pretrained` at its default 1,000 embedded images (upsampled
# to each model's input size) with random weights in fabricated hub caches (the preset's four models:
# ViT-B/16 21k and 1k, ViT-M/16 GAP, ResNet-50), offline; /usr/bin/time -v gives CPU time, wall, peak RSS.
#   benchmarks/bench_pretrained_study.sh [extra study flags, e.g. --max-images 100]
# Run it on an idle machine (check `uptime`); the caches (~0.9 GB) and the study go to a temp dir.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python "$here/fabricate_pretrained_caches.py" "$work/caches"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
HF_HOME="$work/caches/hf" TORCH_HOME="$work/caches/torch" HF_HUB_OFFLINE=1 \
  /usr/bin/time -v vitlens study --preset pretrained --out "$work/study" "$@"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
