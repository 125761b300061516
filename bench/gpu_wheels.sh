#!/usr/bin/env bash
# The wheels bench/gpu.py needs on a GPU machine that has CUDA torch but not this project's pinned
# packages and no network (one with Python 3.12, torch, accelerate, safetensors, tokenizers, numpy,
# tqdm and typer, as the lent H200's image has): the versions this checkout's .venv holds (what CI
# tested), downloaded into .whl/ (git-ignored). bitsandbytes keeps only its CUDA 13 libraries
# (43 MB -> ~5 MB): what travels must stay under 64 MiB. On the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:src python3 bench/gpu.py --out gpu.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-3.12}
version() { .venv/bin/python -c "from importlib.metadata import version; print(version('$1'))"; }
rm -rf .whl && mkdir .whl
names=(transformers huggingface_hub httpx2 httpcore2 truststore kernels tomlkit click gguf)
specs=()
for name in "${names[@]}"; do specs+=("$name==$(version "$name")"); done
specs+=("bitsandbytes==${BITSANDBYTES:-0.50.2}")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${specs[@]}"
wheel=$(ls .whl/bitsandbytes-*.whl)
slim=$(mktemp -d)
(cd "$slim" && unzip -q "$OLDPWD/$wheel" && find bitsandbytes -name 'libbitsandbytes_*.so' \
  ! -name '*cuda130*' ! -name '*cuda132*' ! -name '*cpu*' -delete && rm "$OLDPWD/$wheel" && zip -qr "$OLDPWD/$wheel" .)
rm -rf "$slim"
du -ch .whl/*.whl | tail -1
