"""Adapter training (LoRA, IA3, prefix tuning) on a dataset's train split, for the demo and data-scarce experiments.

The target is the gold continuation after the prompt, exactly as the evaluator scores it
(`Sample.contexts_and_continuations`): the loss covers only the continuation tokens. Runs are deterministic for a
seed on a given machine: the sample subset, batch order and initialisation all derive from it.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from tad_core.adapter_dir import MANIFEST, SAFETENSORS
from tad_core.assets import sha256_file
from tad_core.datasets import load_dataset
from tad_core.formats import canonical_format, format_context, parse_format
from tad_core.models import DEFAULT_BASE, load_model, load_tokenizer, resolve_base_dir
from tad_core.samples import Sample

Method = Literal["lora", "ia3", "prefix"]
METHODS: tuple[str, ...] = ("lora", "ia3", "prefix")
DEFAULT_LR: dict[str, float] = {"lora": 5e-4, "ia3": 3e-3, "prefix": 1e-2}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
PREFIX_VIRTUAL_TOKENS = 16


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run. `lr=None` takes the method's default (`DEFAULT_LR`).

    `threads` is the torch intra-op thread count during training. The default, 1, makes the adapter bytes
    independent of the machine's core count and avoids OpenMP spin-waiting on a shared, oversubscribed CPU
    (measured on 2 shared cores under load: ~3 s CPU per step with 1 thread, ~23 s with 2).
    """

    out: Path
    base: str = DEFAULT_BASE
    dataset: str = "arc_easy"
    split: str = "train"
    method: Method = "lora"
    steps: int = 200
    train_size: int = 500
    seed: int = 0
    lr: float | None = None
    batch_size: int = 8
    max_length: int = 256
    lora_r: int = 8
    lora_alpha: int = 16
    num_virtual_tokens: int = PREFIX_VIRTUAL_TOKENS
    log_every: int = 1
    threads: int = 1
    # multi-task training: several datasets (overrides `dataset`), `train_size` samples drawn from EACH
    datasets: tuple[str, ...] = ()
    format: str = "mc-loglik"  # prompt format of the training pairs (tad_core.formats)
    loss: Literal["response", "all"] = "response"  # loss on the target only, or on the whole sequence
    dataset_name: str | None = None  # label of a dataset file (as `tad run --dataset-name`); one dataset only
    shuffle_choices: int | None = None  # MC choices in a seeded order (as `tad run --shuffle-choices`)

    def __post_init__(self) -> None:
        object.__setattr__(self, "datasets", tuple(self.datasets) or (self.dataset,))
        object.__setattr__(self, "format", canonical_format(self.format))
        if self.loss not in ("response", "all"):
            raise ValueError(f"loss: must be 'response' or 'all', got {self.loss!r}")
        if len(set(self.datasets)) != len(self.datasets):
            raise ValueError(f"datasets: listed twice in {','.join(self.datasets)}")
        if self.dataset_name is not None and len(self.datasets) > 1:
            raise ValueError("dataset_name: labels one dataset file; several datasets keep their own names")
        if self.method not in METHODS:
            raise ValueError(f"method: unknown training method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name in ("steps", "train_size", "batch_size", "max_length", "lora_r", "num_virtual_tokens", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.max_length < 8:
            raise ValueError(f"max_length: must be at least 8 tokens, got {self.max_length}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr: must be a positive finite number, got {self.lr!r}")  # inf trained NaN weights
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed: must be an integer in [0, {2**63 - 1}], got {self.seed!r}")
        object.__setattr__(self, "out", Path(self.out).expanduser())

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


def select_samples(samples: list[Sample], train_size: int, seed: int) -> list[Sample]:
    """The first `train_size` samples after a seeded shuffle (a fixed subset per seed)."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    return [samples[i] for i in order[:train_size]]


def _encode(tok: Any, context: str, target: str, max_length: int, loss: str = "response"
            ) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 on context), harness style: the target's ids are those the whole text adds.

    Over-long rows lose context from the left (the target is what is learnt), and the target is cut at the end
    only if it alone exceeds `max_length`.
    """
    ctx_ids = tok(context, add_special_tokens=True)["input_ids"]
    whole = tok(context + target, add_special_tokens=True)["input_ids"]
    n_ctx = len(ctx_ids)
    while n_ctx > 0 and whole[:n_ctx] != ctx_ids[:n_ctx]:
        n_ctx -= 1  # a merge across the boundary: the shared prefix is the context
    tgt_ids = whole[n_ctx:]
    if not tgt_ids:
        raise ValueError(f"empty target for context ending {context[-40:]!r}")
    tgt_ids = tgt_ids[:max_length - 1]
    ctx_ids = whole[:n_ctx][-(max_length - len(tgt_ids)):]
    return ctx_ids + tgt_ids, (ctx_ids if loss == "all" else [-100] * len(ctx_ids)) + tgt_ids


def _collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest row."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _target_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens, computing LM-head logits only where needed.

    The vocabulary projection dominates the cost of a small model, and targets are a few tokens of each row,
    so we ask for logits at the union of positions that predict a target token (`logits_to_keep` indices).
    """
    labels = batch["labels"]
    positions = (labels[:, 1:] != -100).any(dim=0).nonzero().flatten()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=positions)
    logits = out.logits.float()
    targets = labels[:, positions + 1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=-100)


def _peft_config(cfg: TrainConfig) -> Any:
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, TaskType

    if cfg.method == "lora":
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                          target_modules=list(LORA_TARGETS))
    if cfg.method == "ia3":
        return IA3Config(task_type=TaskType.CAUSAL_LM)
    return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Index batches for `steps` steps: seeded epochs of a fresh permutation, batches never straddle epochs."""
    rng = random.Random(seed + 1)
    out: list[list[int]] = []
    while len(out) < steps:
        perm = list(range(n))
        rng.shuffle(perm)
        out.extend(perm[i:i + batch_size] for i in range(0, n, batch_size))
    return out[:steps]


def _base_fingerprint(base_dir: Path) -> dict[str, Any]:
    src = base_dir / "tad_source.json"
    if src.exists():
        info = json.loads(src.read_text())
        return {"gguf_sha256": info.get("sha256")}
    weights = sorted(base_dir.glob("*.safetensors"))
    return {"weights_sha256": {w.name: sha256_file(w) for w in weights}}


def train_adapter(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Fine-tune an adapter on `cfg.train_size` samples of `cfg.dataset`/`cfg.split`; save it to `cfg.out`.

    Returns the manifest (also written to `out/tad_manifest.json`).
    """
    started = time.time()
    fmt = parse_format(cfg.format)
    base_dir = resolve_base_dir(cfg.base)
    tok = load_tokenizer(base_dir)
    parts: list[tuple[Any, list[Sample]]] = []
    rows: list[tuple[list[int], list[int]]] = []
    for name in cfg.datasets:
        data = load_dataset(name, cfg.split, shuffle_choices=cfg.shuffle_choices, name=cfg.dataset_name)
        if not data.samples:
            raise ValueError(f"dataset: {name!r} split {cfg.split!r} has no samples")
        subset = select_samples(data.samples, cfg.train_size, cfg.seed)
        ctx = replace(format_context(fmt, data.name, data.samples), tokenizer=tok)
        rows.extend(_encode(tok, *fmt.training_pair(s, ctx), cfg.max_length, cfg.loss) for s in subset)
        parts.append((data, subset))

    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        manifest = _train(cfg, parts, base_dir, tok, rows, started, progress)
    finally:
        torch.set_num_threads(threads_before)
    return manifest


def _train(cfg: TrainConfig, parts: list[tuple[Any, list[Sample]]], base_dir: Path, tok: Any,
           rows: list[tuple[list[int], list[int]]], started: float, progress: bool) -> dict[str, Any]:
    from peft import get_peft_model

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    torch.manual_seed(cfg.seed)
    model = load_model(base_dir)
    model.config.use_cache = False
    model = get_peft_model(model, _peft_config(cfg))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)

    losses: list[float] = []
    bar = tqdm(_batches(len(rows), cfg.batch_size, cfg.steps, cfg.seed), desc=f"train {cfg.method}",
               unit="step", disable=not progress)
    for step, idx in enumerate(bar, start=1):
        loss = _target_loss(model, _collate([rows[i] for i in idx], pad_id))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % cfg.log_every == 0 or step == cfg.steps:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()

    model.eval()
    cfg.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(cfg.out), safe_serialization=True)
    weights = cfg.out / SAFETENSORS
    tail = losses[-10:]
    manifest: dict[str, Any] = {
        "base": cfg.base,
        "base_dir": str(base_dir),
        "base_name": base_dir.name,
        "base_fingerprint": _base_fingerprint(base_dir),
        "dataset": "+".join(data.name for data, _ in parts),
        "dataset_source": parts[0][0].source if len(parts) == 1 else "mixture",
        "dataset_content_hash": parts[0][0].content_hash if len(parts) == 1 else "",
        "mixture": [{"dataset": data.name, "train_size": len(subset), "content_hash": data.content_hash,
                     "source": data.source} for data, subset in parts],
        "format": cfg.format,
        "loss": cfg.loss,
        "split": cfg.split,
        "train_size": len(rows),
        "train_size_per_dataset": cfg.train_size,
        "method": cfg.method,
        "steps": cfg.steps,
        "seed": cfg.seed,
        "lr": cfg.learning_rate,
        "batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
        "peft_config": {k: v for k, v in asdict(cfg).items() if k in ("lora_r", "lora_alpha", "num_virtual_tokens")},
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "mean_loss_last_10": sum(tail) / len(tail),
        "losses": losses,
        "adapter_sha256": sha256_file(weights),
        "threads": cfg.threads,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "elapsed_s": round(time.time() - started, 2),
    }
    (cfg.out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if progress:
        tqdm.write(f"final loss {manifest['final_loss']:.4f} (mean of last {len(tail)} steps "
                   f"{manifest['mean_loss_last_10']:.4f}); adapter saved to {cfg.out}")
    return manifest
