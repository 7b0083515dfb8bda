#!/usr/bin/env bash
# Wheels for a GPU machine without network whose Python already has torch, triton, transformers, peft and
# accelerate (python -m fastcps.gpucheck needs the rest): run here, carry .whl/ there, then
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# Versions: those this checkout was tested with (pip show here); the target is CPython 3.12, x86-64 Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=(diffusers deepspeed hjson pydantic pydantic-core annotated-types typing-inspection importlib-metadata)
mkdir -p .whl
for p in "${pkgs[@]}"; do
  v=$(python -m pip show "$p" 2>/dev/null | awk '/^Version:/{print $2}')
  spec=$p${v:+==$v}
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$spec" 2>/dev/null \
  || DS_BUILD_OPS=0 python -m pip wheel -q --no-deps -w .whl "$spec"   # sdist only (deepspeed): a pure-Python wheel, ops JIT-built there
done
ls .whl
