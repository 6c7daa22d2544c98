#!/usr/bin/env bash
# Here, before a device run: the Python packages the GPU machine lacks, as wheels in .whl/
# (ignored by git; carried with carry [".whl"]). Its image has torch, transformers, safetensors,
# accelerate and huggingface_hub, but not diffusers (see the device README's package list).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/.whl/" >> .git/info/exclude; }
version=$(python3 -c "import importlib.metadata as m; print(m.version('diffusers'))" 2>/dev/null || .venv/bin/python -c "import importlib.metadata as m; print(m.version('diffusers'))")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl "diffusers==$version"
ls -la .whl
