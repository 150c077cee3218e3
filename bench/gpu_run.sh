#!/usr/bin/env bash
# The GPU checks and benchmark as one run sized for one 600 s call of a GPU machine (170 s + 380 s + the install),
# from the repository root, with the wheels of `bench/gpu_wheels.sh` in .whl. Logs go to the folder given as $1
# (default: the current one). Each stage has its own time limit and prints as it goes, so a stage cut short still
# leaves what it measured.
set -u
logs=${1:-.}
if [ -f .whl/pins.txt ]; then
  python3 -m pip install -q --no-index --find-links .whl --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site -r .whl/pins.txt \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
export PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 170 python3 bench/device_check.py 2>&1 | tee "$logs/device_check.log"
timeout 380 python3 bench/bench_gpu.py --repeats 2 2>&1 | tee "$logs/bench_gpu.log"
