"""The paired engine: base and fine-tuned next-token logits for a batch of sequences from one forward.

Each sequence may need the fine-tuned side, the base side or both. How they are obtained depends on the pair:
- `mixed` (LoRA and other adapters that support mixed batches): ONE forward over the fine-tuned rows and the base
  rows together, routed with PEFT's `adapter_names`; one KV cache holds every row.
- `two_pass` (prefix tuning): the fine-tuned rows run with the learned prefix as the start of their cache, the base
  rows through the bare base model; two caches.
- `two_models` (full fine-tuning): the two models, two caches.
- `base_only`: no fine-tuned side; both sides are the base model's logits.
The caller owns the token bookkeeping (attention mask over the whole sequence so far, position ids); the runner
adds what its path needs (the prefix's virtual tokens) and keeps the caches.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from transformers import DynamicCache, StaticCache

from tad_core import static_cache
from tad_core.models import PairedModel, is_plain_lora

if TYPE_CHECKING:
    from tad_core.cpu_route import RouteChoice


class RowGate:
    """Per-row switch for a plain LoRA adapter: base rows get exactly the base layer's output.

    PEFT's `adapter_names` mixed batch splits every LoRA layer's input into per-adapter sub-batches in Python, which
    costs more per decoding step than the base rows' forward itself on a GPU. For vanilla LoRA
    (`result = base(x) + lora_B(lora_A(x)) * scaling`) the same result comes from computing the low-rank update for
    all rows and multiplying it by a 0/1 row mask: a forward hook on each `lora_B` does that, vectorised.
    Adapters with variants (DoRA, ...) or non-Linear LoRA layers keep PEFT's `adapter_names` path.
    """

    def __init__(self, peft_model: Any) -> None:
        from peft.tuners.lora import LoraLayer

        self.mask: torch.Tensor | None = None
        for module in peft_model.modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_B:
                module.lora_B["default"].register_forward_hook(self._hook)

    def _hook(self, _module: Any, _args: Any, out: torch.Tensor) -> torch.Tensor:
        return out if self.mask is None else out * self.mask.to(out.dtype)

    @classmethod
    def for_pair(cls, pair: PairedModel) -> "RowGate | None":
        if "row_gate" not in pair.info:
            supported = pair.path == "mixed" and pair.peft_type == "LORA" and is_plain_lora(pair.model)
            pair.info["row_gate"] = cls(pair.model) if supported else None
        return pair.info["row_gate"]


class SmallRowsLinear:
    """CPU kernel choice for the few-row matmuls of paired decoding (2 rows per prompt and step), installed only
    where a measurement at first use shows it faster on this CPU, for the row counts where it is (`for_pair`,
    `tad_core.cpu_route`).

    On some CPUs fp32 `F.linear` with a few input rows goes from BLAS's matrix-vector kernel to a general matmul
    that costs ~1.6-1.75x the one-row call (SmolLM2-135M on a 2-core EPYC, 2 threads: a decode step of the bare base
    model took 45 ms for 1 row and 73 ms for 2), so a paired step at batch 1 cost 1.6x ft's; `weight @ x.T` on the
    same rows ran at the one-row cost (46 ms for 2 rows), and faster than `F.linear` up to 16-32 rows there. Each
    `nn.Linear` of the model gets a forward that takes that route while `active` is set and the call's row count is
    one the measurement chose, on CPU in fp32; every other call, and every call outside the paired forward (ft-only
    decoding stays bit-identical to transformers' generate), is untouched.
    """

    def __init__(self, model: Any, choice: "RouteChoice") -> None:
        # the row counts that take the route (measured, `tad_core.cpu_route`), looked up at every Linear call
        self.rows = frozenset(r for r in range(2, 1 + max(choice.rows, default=1)) if choice.takes(r))
        self.active = False
        self.calls = 0  # matmuls that took the few-rows route (visible to tests and benchmarks)
        for module in model.modules():
            if type(module) is torch.nn.Linear:
                module.forward = self._wrap(module, module.forward)

    def _wrap(self, module: torch.nn.Linear, forward: Any) -> Any:
        def few_rows_forward(x: torch.Tensor) -> torch.Tensor:
            if torch.compiler.is_compiling():  # a compiled graph picks its own kernels; the counter below would
                return forward(x)  # be a guard that changes at every step (a recompile per step)
            rows = x.numel() // x.shape[-1] if x.numel() else 0
            if not (self.active and rows in self.rows and x.device.type == "cpu"
                    and x.dtype == torch.float32 == module.weight.dtype):
                return forward(x)
            self.calls += 1
            out = torch.mm(module.weight, x.reshape(rows, -1).t()).t()
            if module.bias is not None:
                out = out + module.bias
            return out.reshape(*x.shape[:-1], out.shape[-1])
        return few_rows_forward

    @classmethod
    def for_pair(cls, pair: PairedModel) -> "SmallRowsLinear | None":
        """The route's wrapper when this CPU runs few-row matmuls faster as `weight @ x.T` (measured once per pair
        by `tad_core.cpu_route`, kept in `pair.info["few_rows_route"]`, which a caller may also set to a
        `RouteChoice` beforehand to impose a route); None on other devices or where `F.linear` is as fast."""
        if "small_rows_linear" not in pair.info:
            wrapper = None
            if pair.device.type == "cpu":
                from tad_core.cpu_route import measure

                choice = pair.info.setdefault("few_rows_route", None) or measure(pair.model)
                pair.info["few_rows_route"] = choice
                wrapper = cls(pair.model, choice) if choice.route == "mm" else None
            pair.info["small_rows_linear"] = wrapper
        return pair.info["small_rows_linear"]


class PairedRunner:
    """Stateful forwards (with KV caches) for N sequences of one batch."""

    def __init__(self, pair: PairedModel, need_ft: Sequence[bool], need_base: Sequence[bool],
                 output_hidden_states: bool = False, static_len: int | None = None,
                 step: Any = None) -> None:
        """`static_len`: keep every cache as a preallocated `StaticCache` of that many positions (prompt + new
        tokens) instead of a growing `DynamicCache`, with the attention mask padded to it, so every decoding step
        has the same shapes and the same tensor addresses (what a captured graph needs). `step`: a callable that
        replaces `pair.model(...)` for its single-token steps (a compiled forward, see `tad_core.decode_path`;
        not on the `two_pass` path, whose base rows run the same module with the adapter switched off); None = the
        model itself."""
        self.pair = pair
        self.static_len = static_len
        self.step = step
        self.n = len(need_ft)
        if pair.path == "base_only":  # the only model is the base: compute it once, serve it as both sides
            need_ft = [a or b for a, b in zip(need_ft, need_base)]
            need_base = [False] * self.n
        self.ft_rows = [i for i, x in enumerate(need_ft) if x]
        self.base_rows = [i for i, x in enumerate(need_base) if x]
        self.output_hidden_states = output_hidden_states
        # fine-tuned side's hidden states of the last call: rows in `ft_rows` order, the positions of the kept logits
        self.hidden: tuple[torch.Tensor, ...] | None = None
        self._caches: dict[str, DynamicCache | StaticCache] = {}
        self._cache_models: dict[str, Any] = {}  # the model each cache belongs to (its config shapes the cache)
        self._nvt = 0
        if pair.path == "two_pass" and pair.model.peft_config["default"].is_prompt_learning:
            cfg = pair.model.peft_config["default"]
            if cfg.peft_type.value != "PREFIX_TUNING":
                raise NotImplementedError(f"paired decoding with a {cfg.peft_type.value} adapter is not supported "
                                          "(supported: weight adapters such as LoRA or IA3, prefix tuning, "
                                          "full fine-tuning)")
            self._nvt = int(cfg.num_virtual_tokens)

    # ---- model calls per path -------------------------------------------------------------------------------
    def _call(self, model: Any, cache_key: str, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
              keep: int, **kw: Any) -> Any:
        cache = self._caches.get(cache_key)
        if cache is None:
            initial = kw.pop("initial_cache", None)
            if initial is None and self.static_len:
                initial = static_cache.pooled(self.pair, model, cache_key, ids.shape[0], self.static_len)
            cache = self._caches[cache_key] = initial or DynamicCache()
            self._cache_models[cache_key] = model
        else:
            kw.pop("initial_cache", None)
        fn = model
        if isinstance(cache, StaticCache):
            if mask.shape[1] > self.static_len:
                raise ValueError(f"sequence of {mask.shape[1]} tokens exceeds the static cache of {self.static_len}")
            mask = torch.nn.functional.pad(mask, (0, self.static_len - mask.shape[1]))
            if (self.step is not None and ids.shape[1] == 1 and model is self.pair.model
                    and self.pair.path != "two_pass"):  # two_pass toggles the adapter around the same module
                fn = self.step
        return fn(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                  logits_to_keep=keep, **kw)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                logits_to_keep: int = 0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Feed new tokens of all N sequences; return (z_b, z_f), each [N, T_kept, V] (rows not needed are 0)."""
        pair, ft, base = self.pair, self.ft_rows, self.base_rows
        hs = self.output_hidden_states
        device = pair.device
        input_ids, attention_mask, position_ids = (t.to(device) for t in (input_ids, attention_mask, position_ids))
        z_f = z_b = None
        if pair.path == "mixed" and ft and base:
            rows = ft + base
            gate = RowGate.for_pair(pair)
            few = SmallRowsLinear.for_pair(pair)
            routing: dict[str, Any] = {}
            if gate is not None:
                gate.mask = torch.cat([torch.ones(len(ft)), torch.zeros(len(base))]).view(-1, 1, 1).to(device)
            else:
                routing["adapter_names"] = ["default"] * len(ft) + ["__base__"] * len(base)
            if few is not None:
                few.active = True
            try:
                out = self._call(pair.model, "all", input_ids[rows], attention_mask[rows], position_ids[rows],
                                 logits_to_keep, output_hidden_states=hs, **routing)
            finally:
                if gate is not None:
                    gate.mask = None
                if few is not None:
                    few.active = False
            logits = out.logits
            z_f = self._scatter(logits[: len(ft)], ft)
            z_b = self._scatter(logits[len(ft):], base)
            if hs:
                self.hidden = _kept(out.hidden_states, len(ft), logits_to_keep)
            return z_b, z_f
        if ft:
            model, extra = self._ft_model()
            mask = attention_mask[ft]
            pos = position_ids[ft]
            if self._nvt:
                mask = torch.cat([mask.new_ones(len(ft), self._nvt), mask], dim=1)
                pos = pos + self._nvt
            out = self._call(model, "ft", input_ids[ft], mask, pos, logits_to_keep, output_hidden_states=hs, **extra)
            z_f = self._scatter(out.logits, ft)
            if hs:
                self.hidden = _kept(out.hidden_states, len(ft), logits_to_keep)
        if base:
            out = self._base_call(input_ids[base], attention_mask[base], position_ids[base], logits_to_keep)
            z_b = self._scatter(out.logits, base)
        if pair.path == "base_only":
            z_b = z_f
        return z_b, z_f

    def _ft_model(self) -> tuple[Any, dict[str, Any]]:
        pair = self.pair
        if self._nvt:
            extra: dict[str, Any] = {}
            if "ft" not in self._caches:
                prompt = pair.model.get_prompt(len(self.ft_rows))
                extra["initial_cache"] = prompt if isinstance(prompt, DynamicCache) else DynamicCache.from_legacy_cache(prompt)
            return pair.model.get_base_model(), extra
        return pair.model, {}

    def _base_call(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, keep: int) -> Any:
        pair = self.pair
        if pair.path == "two_models":
            return self._call(pair.base_model, "base", ids, mask, pos, keep)
        if self._nvt:
            return self._call(pair.model.get_base_model(), "base", ids, mask, pos, keep)
        with pair.model.disable_adapter():  # weight adapter: base rows with the adapter switched off
            return self._call(pair.model, "base", ids, mask, pos, keep)

    def _scatter(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        if len(rows) == self.n:
            return logits
        full = logits.new_zeros((self.n,) + tuple(logits.shape[1:]))
        full[rows] = logits
        return full

    def select(self, seq_index: Sequence[int], need_ft: Sequence[bool] | None = None,
               need_base: Sequence[bool] | None = None) -> None:
        """Re-shape the batch: new sequence j continues old sequence `seq_index[j]` (repeats allowed), keeping
        the fine-tuned / base side only where `need_ft[j]` / `need_base[j]` (default: every side it had).

        This is how one prompt's prefill serves several strategies: the caches (and the last hidden states) are
        copied row by row, so the continuations decode exactly as if each had encoded the prompt itself."""
        seq_index = list(seq_index)
        if self.pair.path == "base_only" and need_ft is not None and need_base is not None:
            need_ft, need_base = [a or b for a, b in zip(need_ft, need_base)], None
        ft_pos = {s: i for i, s in enumerate(self.ft_rows)}
        base_pos = {s: i for i, s in enumerate(self.base_rows)}
        new_ft = [j for j, s in enumerate(seq_index) if s in ft_pos and (need_ft is None or need_ft[j])]
        new_base = [j for j, s in enumerate(seq_index) if s in base_pos and (need_base is None or need_base[j])]
        ft_idx = [ft_pos[seq_index[j]] for j in new_ft]
        base_idx = [base_pos[seq_index[j]] for j in new_base]
        for key, cache in self._caches.items():
            if key == "all":
                idx = ft_idx + [len(self.ft_rows) + i for i in base_idx]
            else:
                idx = ft_idx if key == "ft" else base_idx
            index = torch.tensor(idx, dtype=torch.long, device=self.pair.device)
            if isinstance(cache, StaticCache):
                self._caches[key] = static_cache.select_rows(self.pair, self._cache_models[key], key, cache, index)
            else:
                cache.batch_select_indices(index)
        if self.hidden is not None:
            self.hidden = tuple(h[ft_idx] for h in self.hidden)
        self.ft_rows, self.base_rows, self.n = new_ft, new_base, len(seq_index)
        self.forwards_since_select = 0


def _kept(hidden: tuple[torch.Tensor, ...], n_ft: int, keep: int) -> tuple[torch.Tensor, ...]:
    """The fine-tuned rows' hidden states at the positions whose logits were kept (rows in `ft_rows` order)."""
    return tuple((h[:n_ft, -keep:] if keep else h[:n_ft]) for h in hidden)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (input_ids, attention_mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as transformers' generate computes them for left-padded batches."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
