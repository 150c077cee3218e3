"""Shared helpers for the benchmarks: a LoRA pair on the embedded model, timing with warm-up, table printing."""
from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def cpu_model() -> str:
    """The CPU's model name (as lscpu prints it) and its widest vector / matrix extensions: CPU figures depend on
    both, so every benchmark line names them."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("", platform.machine(), platform.processor()):
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    ext = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(ext) or 'no AVX2'})"


def machine() -> str:
    import os

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return (f"{platform.machine()}, {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {dev}, "
            f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")


def random_lora(base_dir: Path, out: Path, seed: int = 0, r: int = 8) -> Path:
    """A LoRA on q/k/v/o with random non-zero weights: same compute as a trained one, no training needed."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (out / "adapter_config.json").exists():
        return out
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    get_peft_model(model, cfg).save_pretrained(str(out))
    return out


def timeit(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median wall time of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 3) -> dict[str, float]:
    """Median times of several functions measured round-robin (so machine noise hits them alike)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
