#!/usr/bin/env bash
# Wheels for a GPU machine that has its own Python (3.12 so far) with CUDA torch but no package index:
# `bench/gpu_run.sh` installs them there, beside its torch. They are transformers and peft and every package they
# need (their closure, read from this checkout's .venv; torch, its CUDA libraries and numpy left out), all at the
# versions of requirements.lock: the machine's own transformers stack is older (5.17 with an older huggingface_hub,
# which the pinned transformers refuses at import), and the static-cache code follows the pinned transformers' cache
# API. Wheels are fetched for Pythons 3.11-3.13 (only a few packages are version-specific) and the pins written to
# .whl/pins.txt, so pip there takes the right ones. Run here, from the repository root, after `make setup`:
# bench/gpu_wheels.sh [PYVER ...]
set -euo pipefail
pyvers=${*:-3.11 3.12 3.13}
pins=$(PYVERS="$pyvers" .venv/bin/python - <<'PY'
import importlib.metadata as md
import os
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

lock = {}
for line in Path("requirements.lock").read_text().splitlines():
    if "==" in line and not line.startswith("#"):
        name, version = line.split(";")[0].strip().split("==")
        lock[canonicalize_name(name)] = version
# a dependency is needed if its marker holds on any of the Pythons fetched for
envs = [{"python_version": v, "platform_machine": "x86_64", "sys_platform": "linux", "extra": ""}
        for v in os.environ["PYVERS"].split()]
# torch's own stack stays the machine's (numpy with it); wheels are carried within 64 MB, so scipy is left out too
# (tad_core imports it only for its statistics, which the GPU scripts do not use)
skip = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|numpy|scipy)$")
seen, todo = set(), ["transformers", "peft", "pyyaml", "tqdm"]  # the last two: tad_core's own imports
while todo:
    name = canonicalize_name(todo.pop())
    if name in seen or skip.match(name):
        continue
    seen.add(name)
    for r in md.requires(name) or []:
        req = Requirement(r)
        if not req.marker or any(req.marker.evaluate(env) for env in envs):
            todo.append(req.name)
print(" ".join(f"{n}=={lock[n]}" for n in sorted(seen)))
PY
)
rm -rf .whl && mkdir -p .whl
for pyver in $pyvers; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl $pins
done
echo "$pins" | tr ' ' '\n' > .whl/pins.txt
ls .whl | wc -l && du -sh .whl
