#!/usr/bin/env bash
# Wheels of the pinned transformers and peft (requirements.lock) for a GPU machine that has its own Python 3.12 with
# CUDA torch but no package index: `bench/gpu_run.sh` installs them there. The static-cache code follows the pinned
# transformers' cache API, which older releases do not have. Run here, from the repository root.
set -euo pipefail
versions=$(grep -E '^(transformers|peft)==' requirements.lock)
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $versions
ls -la .whl
