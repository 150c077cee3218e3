"""GPU generation benchmark (issue 16): ours (ft, TaD) vs transformers' generate, and the weight-bandwidth limit.

    python bench/bench_gpu.py            # on a GPU: batch 1/8/32, 128-token prompts, 128 new tokens, TAD_DTYPE=auto (bf16)
    python bench/bench_gpu.py --smoke    # a tiny config on the CPU: checks the script runs (figures meaningless)

Prints, per batch size, every variant timed in the same process (median of `--repeats` after a warm-up):
- ours `ft` and `tad` (one mixed LoRA batch) on the pair's decoding path (`tad_core.decode_path`: compiled CUDA
  graphs on a GPU, with the fallback and its reason printed), and ours `ft` on the eager dynamic-cache path;
- transformers' `generate` on the same fine-tuned model, eager (dynamic cache) and with its static cache
  (compiled by transformers on CUDA with `mode="reduce-overhead"`; eager on the CPU);
- the fraction of the weight-bandwidth limit ft reaches: weight bytes x decode steps/s / the device's memory
  bandwidth (both printed; `--hbm-gbs` sets the bandwidth, known GPUs are looked up by name);
- peak memory (GPU: `max_memory_allocated`; CPU: the process's peak RSS).
No weights or tokenizer files are needed: the model is random-init from a Llama-3.2-1B-like config (1.24B
parameters) and the tokenizer is a word-level vocabulary built in memory (token ids are what is measured).
"""
from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine  # noqa: E402
from tad_core.decode_path import choose  # noqa: E402
from tad_core.dtypes import resolve_dtype, torch_dtype  # noqa: E402
from tad_core.generation import GenConfig, generate_texts  # noqa: E402
from tad_core.models import PairedModel  # noqa: E402
from tad_core.strategies import StrategySpec, build  # noqa: E402

# Peak memory bandwidth in GB/s by device-name fragment (vendor figures; the first match wins).
HBM_GBS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0,
           "A100 80GB PCIe": 1935.0, "A100": 1555.0, "L40S": 864.0, "A10G": 600.0, "L4": 300.0}


def word_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", eos_token="t1", unk_token="t0")
    tok.padding_side = "left"
    return tok


def build_pair(smoke: bool, device: str, dtype: torch.dtype) -> PairedModel:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if smoke:
        cfg = LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    else:  # Llama-3.2-1B-like: 1.24B parameters
        cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                          tie_word_embeddings=True, rope_theta=500000.0)
    cfg.pad_token_id, cfg.eos_token_id = 0, 1
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora).to(device=device, dtype=dtype).eval()
    return PairedModel(peft_model, word_tokenizer(cfg.vocab_size), "mixed", "random-llama", Path("."),
                       peft_type="LORA")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter, each counted once (tied embeddings once): what one decode step reads."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def timed(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up (and, on compiled paths, the compilation)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def hbm_gbs(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in HBM_GBS.items() if k in name), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU (checks the script runs)")
    ap.add_argument("--batches", default=None, help="comma list (default 1,8,32; --smoke 1,8)")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA), float32, bfloat16, float16")
    ap.add_argument("--hbm-gbs", type=float, default=None, help="memory bandwidth in GB/s (default: by GPU name)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    dtype = torch_dtype(resolve_dtype(args.dtype, device))
    batches = [int(b) for b in (args.batches or ("1,8" if args.smoke else "1,8,32")).split(",")]
    plen = args.prompt_len or (16 if args.smoke else 128)
    new = args.tokens or (16 if args.smoke else 128)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dev_name = torch.cuda.get_device_name(0) if cuda else "CPU"
    bw = hbm_gbs(dev_name, args.hbm_gbs)
    print(f"machine: {machine()}")
    pair = build_pair(args.smoke or not cuda, device, dtype)
    wbytes = weight_bytes(pair.model)
    n_params = sum(p.numel() for p in pair.model.get_base_model().parameters())
    print(f"model: {n_params / 1e9:.3f}B parameters + LoRA r=16, {dtype}, {device}; weight bytes {wbytes / 1e9:.3f} GB;"
          f" memory bandwidth {f'{bw:.0f} GB/s' if bw else 'unknown (pass --hbm-gbs)'}; "
          f"{plen}-token prompts, {new} new tokens, greedy, EOS ignored")
    cfg = GenConfig(max_new_tokens=new, ignore_eos=True, kv_steps=False)
    eager = dataclasses.replace(cfg, decode="dynamic")
    ft, tad = build(StrategySpec("ft")), build(StrategySpec("tad"))
    g = torch.Generator().manual_seed(0)
    vocab = pair.model.get_base_model().config.vocab_size
    print("| batch | ours ft tok/s | ours tad tok/s | tad/ft | ours ft eager dynamic tok/s | hf generate eager tok/s |"
          " hf generate static (compiled on CUDA) tok/s | ours ft / best hf (time) | ft steps/s | % of weight-bandwidth"
          " limit | peak memory |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for bs in batches:
        prompts = [" ".join(f"t{int(i)}" for i in torch.randint(2, vocab, (plen,), generator=g)) for _ in range(bs)]
        enc = pair.tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def hf(cache: str | None) -> Callable[[], None]:
            def go() -> None:
                with torch.no_grad():
                    pair.model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                                        cache_implementation=cache)
            return go

        t = {"ft": timed(lambda: generate_texts(pair, prompts, [ft], cfg), args.repeats, sync),
             "tad": timed(lambda: generate_texts(pair, prompts, [tad], cfg), args.repeats, sync),
             "ft_eager": timed(lambda: generate_texts(pair, prompts, [ft], eager), args.repeats, sync),
             "hf_eager": timed(hf(None), args.repeats, sync),
             "hf_static": timed(hf("static"), args.repeats, sync)}
        toks = bs * new
        steps = new / t["ft"]
        limit = f"{100 * wbytes * steps / (bw * 1e9):.1f}%" if bw else "-"
        peak = (f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else
                f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB RSS")
        best_hf = min(t["hf_eager"], t["hf_static"])
        print(f"| {bs} | {toks / t['ft']:.0f} | {toks / t['tad']:.0f} | **{t['tad'] / t['ft']:.2f}** | "
              f"{toks / t['ft_eager']:.0f} | {toks / t['hf_eager']:.0f} | {toks / t['hf_static']:.0f} | "
              f"**{t['ft'] / best_hf:.2f}** | {steps:.0f} | **{limit}** | {peak} |", flush=True)
    print(f"decoding path: {choose(pair).describe()}; process-wide (ours and transformers'): graphs compiled "
          f"{counters['stats']['unique_graphs']}, CUDA graphs skipped {counters['inductor']['cudagraph_skips']}")
    # Ten strategies per prompt (a worker's sweep), batch 8: the pair's path (on CUDA the compiled forward and all
    # strategies in one compiled step, tad_core.fused_step) against eager steps on the same static cache.
    ten = [build(StrategySpec(n, p)) for n, p in (("ft", {}), ("base", {}), *(("tad", {"alpha": a}) for a in
           (0.5, 1.0, 2.0, 4.0)), ("tad_log", {}), ("tad_log", {"beta": 0.5}), ("contrastive", {}),
           ("contrastive", {"tau": 0.5}))]
    prompts = [" ".join(f"t{int(i)}" for i in torch.randint(2, vocab, (plen,), generator=g)) for _ in range(8)]
    static = dataclasses.replace(cfg, decode="static")
    t10 = {"path": timed(lambda: generate_texts(pair, prompts, ten, cfg), args.repeats, sync),
           "static": timed(lambda: generate_texts(pair, prompts, ten, static), args.repeats, sync)}
    fused = list(pair.info.get("fused_steps", {}).values())
    print(f"10 strategies x batch 8, {new} tokens: pair's path {t10['path']:.2f} s, eager static {t10['static']:.2f} s,"
          f" **static / path = {t10['static'] / t10['path']:.2f}**; compiled strategy steps: "
          f"{[(f.compiled.calls, f.compiled.failed) for f in fused] or 'none (not the compiled path)'}")


if __name__ == "__main__":
    main()
