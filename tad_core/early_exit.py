"""Early-exit ("logit lens") logits of intermediate layers, from hidden states of the forward that already ran.

Used by DoLa: `premature logits = lm_head(final_norm(hidden_states[layer]))`, with the model's final logit
soft-capping applied the same way as to the final logits (Gemma 2/3). Only the positions and layers a strategy
reads are projected, so the cost is one `[N_pos, H] x [H, V]` product per candidate layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch


@dataclass(frozen=True)
class OutputHead:
    """What turns a hidden state into logits, plus the layer facts DoLa's candidate buckets depend on."""

    norm: Any  # the decoder's final norm module
    lm_head: Any  # the output embedding
    softcap: float | None  # final_logit_softcapping (Gemma), None when off
    num_layers: int
    tied_embeddings: bool


def _hf_model(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_head(model: Any) -> OutputHead:
    """Find the final norm and output embedding of a Llama-family or Gemma3 causal LM (PEFT-wrapped or not)."""
    hf = _hf_model(model)
    lm_head = hf.get_output_embeddings()
    decoder = hf.get_decoder() if hasattr(hf, "get_decoder") else getattr(hf, "model", None)
    norm = getattr(decoder, "norm", None)
    if norm is None and hasattr(decoder, "language_model"):  # multimodal wrappers (Gemma3ForConditionalGeneration)
        norm = getattr(decoder.language_model, "norm", None)
    if lm_head is None or norm is None:
        raise ValueError(f"{type(hf).__name__}: cannot find the final norm and output embedding needed for "
                         "early-exit logits (supported: Llama-family and Gemma3 causal LMs)")
    softcap = getattr(_text_config(hf.config), "final_logit_softcapping", None)
    return OutputHead(norm, lm_head, float(softcap) if softcap else None, *layer_layout(hf.config))


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def layer_layout(config: Any) -> tuple[int, bool]:
    """(decoder layers, tied input and output embeddings) of a model config: what DoLa's candidate layers depend
    on, read the same way for a loaded model and for a submission checked against a config on disk."""
    text_cfg = _text_config(config)
    tied = getattr(config, "tie_word_embeddings", None)
    if tied is None:
        tied = getattr(text_cfg, "tie_word_embeddings", False)
    return int(text_cfg.num_hidden_layers), bool(tied)


def premature_logits(head: OutputHead, hidden: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """`lm_head(norm(h))` (soft-capped like the final logits) per layer, in float32; `h` is `[..., H]`."""
    dtype = head.lm_head.weight.dtype
    out: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for layer, h in hidden.items():
            logits = head.lm_head(head.norm(h.to(dtype))).float()
            if head.softcap is not None:
                logits = torch.tanh(logits / head.softcap) * head.softcap
            out[layer] = logits
    return out


def step_extras(head: OutputHead, hidden: Mapping[int, torch.Tensor]) -> dict[str, Any]:
    """The `Step.extras` a hidden-state strategy reads: premature logits and the layer facts."""
    return {"premature_logits": premature_logits(head, hidden), "num_layers": head.num_layers,
            "tied_embeddings": head.tied_embeddings}
