"""GPU generation benchmark (issue 3): TaD vs ft on a ~1B Llama built from a config with random weights.

    python bench/bench_gpu.py            # on a GPU: bf16, batch 1/8/32, 128-token prompts, 128 new tokens
    python bench/bench_gpu.py --small    # the same script, small and slow, on the CPU (checks it runs)

Prints, per batch size: ft and TaD (one mixed LoRA batch) wall time and tokens/s, the ratio TaD/ft (target
<= 1.1), the naive two-forwards-per-step TaD beside it, and our ft greedy vs transformers' generate.
No weights or tokenizer files are needed: the model is random-init from a Llama-3.2-1B-like config and the
tokenizer is a word-level vocabulary built in memory (token ids are what is measured).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine  # noqa: E402
from tad_core.generation import GenConfig, generate_texts  # noqa: E402
from tad_core.models import PairedModel  # noqa: E402
from tad_core.strategies import StrategySpec, build  # noqa: E402


def word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", eos_token="t1", unk_token="t0")
    tok.padding_side = "left"
    return tok


def build_pair(small: bool, device: str, dtype: torch.dtype) -> PairedModel:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if small:
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
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e9:.2f}B parameters, {dtype}, {device}")
    return PairedModel(peft_model, word_tokenizer(cfg.vocab_size), "mixed", "random-llama", Path("."),
                       peft_type="LORA")


def timed(fn, repeats: int, sync) -> float:
    fn()
    sync()
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best.append(time.perf_counter() - t0)
    return sorted(best)[len(best) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--batches", default=None)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.small
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    batches = [int(b) for b in (args.batches or ("1,8,32" if cuda else "1,4")).split(",")]
    plen = args.prompt_len or (128 if cuda else 16)
    new = args.tokens or (128 if cuda else 16)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(f"machine: {machine()}")
    pair = build_pair(args.small or not cuda, device, dtype)
    naive = dataclasses.replace(pair, path="two_pass")
    cfg = GenConfig(max_new_tokens=new, ignore_eos=True, kv_steps=False)
    bare = GenConfig(max_new_tokens=new, ignore_eos=True, kv_steps=False, kv_stats=False)
    ft, tad = build(StrategySpec("ft")), build(StrategySpec("tad"))
    g = torch.Generator().manual_seed(0)
    vocab = pair.model.get_base_model().config.vocab_size
    print("| batch | ft s (tok/s) | tad s (tok/s) | tad/ft | tad without kv stats / ft | naive two-pass tad/ft | "
          "ours ft / transformers generate |")
    print("|---|---|---|---|---|---|---|")
    for bs in batches:
        prompts = [" ".join(f"t{int(i)}" for i in torch.randint(2, vocab, (plen,), generator=g)) for _ in range(bs)]
        t_ft = timed(lambda: generate_texts(pair, prompts, [ft], cfg), args.repeats, sync)
        t_tad = timed(lambda: generate_texts(pair, prompts, [tad], cfg), args.repeats, sync)
        t_bare = timed(lambda: generate_texts(pair, prompts, [tad], bare), args.repeats, sync)
        t_naive = timed(lambda: generate_texts(naive, prompts, [tad], cfg), args.repeats, sync)
        enc = pair.tokenizer(prompts, return_tensors="pt", padding=True).to(device)

        def hf() -> None:
            with torch.no_grad():
                pair.model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

        t_hf = timed(hf, args.repeats, sync)
        toks = bs * new
        print(f"| {bs} | {t_ft:.2f} ({toks / t_ft:.0f}) | {t_tad:.2f} ({toks / t_tad:.0f}) | **{t_tad / t_ft:.2f}** | "
              f"{t_bare / t_ft:.2f} | {t_naive / t_ft:.2f} | {t_ft / t_hf:.2f} |", flush=True)
    if cuda:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
