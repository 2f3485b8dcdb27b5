#!/usr/bin/env bash
# Regenerate reports/ from real runs of the bundled models (CPU: 53 min on 2 loaded cores, most of it
# the SmolLM2 --verify search: each probe re-runs the held-out pass and the passkeys).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
A=.venv/bin/attn-audit
$A smollm2-135m-instruct --seq-len 256,512,1024 --num-sequences 8 --verify --verify-sequences 2 \
   --target-len 4096 --retrieval-len 1024 --export minference,duo,flex --format json,md,html --force --quiet \
   --fail-if 'planned_flops_saving < 0.1' --fail-if 'ppl_increase > 0.05' \
   --out reports/smollm2-135m-instruct || [ $? -eq 1 ]
$A all-minilm-l6-v2 --seq-len 128,256,512 --num-sequences 16 --verify --verify-sequences 4 \
   --format json,md,html --force --quiet --out reports/all-minilm-l6-v2 || [ $? -eq 1 ]
# Gemma 3 270M past its 512-token sliding window, so its local and global layers differ.
$A gemma3-270m --seq-len 768 --num-sequences 4 --format json,md,html --force --quiet \
   --out reports/gemma3-270m || [ $? -eq 1 ]
# A screenshot of the SmolLM2 HTML report for the README (needs Debian's chromium).
if command -v chromium >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync --hide-scrollbars \
    --user-data-dir="$tmp" --window-size=1280,1600 --screenshot=reports/screenshot.png \
    "file://$PWD/reports/smollm2-135m-instruct/report.html" >/dev/null 2>&1 || true
  rm -rf "$tmp"
fi
ls -la reports/*/
