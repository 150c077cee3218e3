"""The preallocated KV caches of the static and compiled decoding paths (`tad_core.decode_path`), one pool per pair.

A captured graph (CUDA graphs under `torch.compile(mode="reduce-overhead")`) reads and writes its cache at the
addresses it was captured with. A cache allocated per batch has new addresses every batch, so every batch of a
worker re-records its graphs, and cudagraph trees keep every recording and scan them at each replay. The pool keeps
one cache per (cache key, rows, length) and hands the same tensors to the next batch of that layout, zeroed
(prefill) or overwritten row by row (`select_rows`): a worker's batches replay the graphs they share. Caches stay
allocated between batches (as transformers' `generate` keeps its static cache on the model); the pool holds at
most `MAX_CACHES` of them per pair and at most `BUDGET_FRACTION` of the device's memory (a worker's batches of
many lengths would otherwise keep 8 caches of its largest layouts: a cache of an 8B Llama for 64 rows of 2,048
positions in bf16 is 17 GB), least recently used first out. An evicted layout costs a new cache and, on CUDA, a
new recording when it comes back; nothing else.

Every layer is a full-length `StaticLayer`, sliding-window layers included: transformers' sliding static layer
counts its fill level in a Python int that torch.compile guards on, so a compiled decoding step recompiled the
model at every step (a tiny Gemma-3: 20 graphs for 20 steps). The window is still applied: transformers builds the
sliding layers' attention mask from the config's `sliding_window`, over the cache's slots, as it does for the
dynamic cache (tests compare the tokens with the dynamic cache's, past the window).

Not thread-safe: one generation at a time per pair (as the row gate of `tad_core.engine` already requires).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from tad_core.models import PairedModel

MAX_CACHES = 8  # a batch uses 2 (prefill rows, decoding rows) per cache key; two-model pairs have 2 keys
BUDGET_FRACTION = 0.25  # of the device's memory (CUDA: the GPU's, CPU: the machine's RAM) the pool may hold


def budget_bytes(device: torch.device) -> int:
    """The bytes a pair's pool may hold on `device`: `BUDGET_FRACTION` of its total memory."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(BUDGET_FRACTION * total)


def cache_bytes(cache: StaticCache) -> int:
    """Bytes of the cache's allocated key and value tensors (layers allocate at their first forward)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers if layer.is_initialized
               for t in (layer.keys, layer.values))


def model_config(model: Any) -> Any:
    """The transformers config a StaticCache is shaped from (a PEFT model's is its base model's)."""
    return model.get_base_model().config if hasattr(model, "get_base_model") else model.config


def new_static_cache(model: Any, length: int) -> StaticCache:
    """An empty static cache of `length` positions, every layer full-length (see the module docstring)."""
    cache = StaticCache(config=model_config(model), max_cache_len=length)
    cache.layers = [StaticLayer(max_cache_len=length) if layer.is_sliding else layer for layer in cache.layers]
    return cache


def pooled(pair: PairedModel, model: Any, key: str, rows: int, length: int, empty: bool = True) -> StaticCache:
    """The pair's cache for `rows` sequences of `length` positions under `key` ("all", "ft", "base"): the same
    tensors as the last batch of this layout (zeroed if `empty`), or a new cache."""
    pool: OrderedDict[tuple[str, int, int], StaticCache] = pair.info.setdefault("static_caches", OrderedDict())
    ident = (key, rows, length)
    cache = pool.pop(ident, None)
    if cache is None:
        cache = new_static_cache(model, length)
    elif empty:
        cache.reset()
    pool[ident] = cache
    budget = budget_bytes(pair.device)
    # Least recently used out, never the cache just handed out (the last): it has no tensors yet when it is new,
    # so the pool overshoots the budget by at most that one cache until the next call.
    while len(pool) > MAX_CACHES or (len(pool) > 1 and sum(map(cache_bytes, pool.values())) > budget):
        pool.popitem(last=False)
    return cache


def select_rows(pair: PairedModel, model: Any, key: str, src: StaticCache, index: torch.Tensor) -> StaticCache:
    """A cache holding `src`'s rows `index` (repeats allowed), in the pool's tensors for that many rows: the
    decoding steps that follow run on the same addresses batch after batch. `src` may be that same cache."""
    dst = pooled(pair, model, key, int(index.numel()), src.layers[0].max_cache_len, empty=False)
    for s, d in zip(src.layers, dst.layers):
        if not s.is_initialized:
            continue
        keys, values = s.keys[index], s.values[index]  # gathered first: `dst` may be `src`
        if not d.is_initialized:
            d.lazy_initialization(keys, values)  # allocates, and marks the tensors as static addresses
        d.keys.copy_(keys)
        d.values.copy_(values)
        d.cumulative_length.copy_(s.cumulative_length)
    return dst
