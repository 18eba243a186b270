#!/usr/bin/env bash
# Download the wheels the GPU check carries to a machine that has torch, accelerate, peft, transformers,
# safetensors, numpy and matplotlib but no network: diffusers (the version installed here) and its missing
# pure-Python needs, for CPython 3.12 on x86-64 Linux, into .whl/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
diffusers_version="$(python3 -c 'import diffusers; print(diffusers.__version__)')"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "diffusers==$diffusers_version" toml==0.10.2 importlib_metadata
ls -l .whl
