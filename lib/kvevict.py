"""An eviction KV cache with per-head budgets (SnapKV / SparseMM), optionally bit-packed by the KV quantizer.

Use::

    budget = KVBudgetConfig.build(256, layers, kv_heads, scores=head_scores)   # lib/kvbudget.py
    with kv_budget_attention(model):
        cache = EvictionKVCache.for_model(model, budget, kv_config=None)   # or a KVQuantConfig for bits
        out = model.generate(ids, past_key_values=cache, max_new_tokens=32)

How it works, without patching model classes:

* ``kv_budget_attention(model)`` switches the language model to the attention function ``"optspa_kvbudget"``,
  registered in transformers' ``AttentionInterface`` (with sdpa's mask function in ``AttentionMaskInterface``),
  and restores the previous implementation on exit.  For any cache other than this one it *is* sdpa.
* Prefill (the first update of a layer): the layer stores nothing yet and hands the full-precision K/V to the
  attention, which is computed exactly (full attention, sdpa).  The attention function then passes the queries to
  the layer, which scores the past tokens with the last window's queries and keeps, per KV head, its capacity of
  highest-scoring tokens plus the window (:mod:`lib.kvbudget`).  If every head keeps everything the layer is
  *exact*: from then on it returns what ``DynamicCache`` would (bit-identical outputs).
* Storage is per KV head (ragged): one ``QuantizedKVLayer`` of :mod:`lib.kvquant` per KV head holds that head's
  kept tokens bit-packed by the existing quantizer with the per-layer bits of a ``KVQuantConfig`` (16/16 bits, or
  no config: kept in the model dtype), so ``nbytes()`` is the real storage of the kept tokens.
* Decoding (and any later multi-token forward) appends to every head.  Attention reads a padded ``[B, kv_heads,
  max kept, D]`` working copy (``workspace_nbytes()``, not counted in ``nbytes()``) with a per-head mask: slot ``s``
  of head ``h`` is visible to new query ``i`` iff ``s < kept_h + i + 1``, which is both the padding and the causal
  mask; the model's own 2-D/4-D mask is not used after eviction, so left-padded batches are not supported (batch
  size 1, or batches without padding, whose rows keep the same number of tokens per head).
* ``get_seq_length()`` is the number of tokens seen (positions), not kept, as for a sliding-window layer.

The prefill attention sees full-precision, uncompressed K/V (the kept tokens are quantized when stored), unlike
``PackedQuantizedCache`` which quantizes before the prefill attention.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .kvbudget import KVBudgetConfig, select_kept, snapkv_scores
from .kvquant import KVQuantConfig, QuantizedKVLayer, kv_dims, num_quantized_tokens

logger = logging.getLogger(__name__)

ATTN_NAME = "optspa_kvbudget"
OFF_BITS = 16

# The layer whose ``update`` ran last in this thread: the attention call of the same decoder layer follows it.
_PENDING = threading.local()


# --------------------------------------------------------------------------------------------------------------
# Attention function
# --------------------------------------------------------------------------------------------------------------
def _take_pending(module: nn.Module) -> EvictingKVLayer | None:
    layer = getattr(_PENDING, "layer", None)
    _PENDING.layer = None
    if layer is None or layer.layer_idx != getattr(module, "layer_idx", None):
        return None
    return layer


def kvbudget_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """sdpa, plus: prefill queries go to the evicting layer; after eviction, per-head padding/causal masks."""
    layer = _take_pending(module)
    if layer is None or layer.is_exact():
        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     **kwargs)
        if layer is not None and layer.awaiting_queries:
            layer.compress(query, scaling if scaling is not None else query.shape[-1] ** -0.5)
        return out
    groups = query.shape[1] // key.shape[1]
    mask = layer.visibility(query.shape[2]).repeat_interleave(groups, dim=1)  # [1, Hq, q, P]
    out = nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1), attn_mask=mask,
        dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_NAME, kvbudget_attention_forward)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _attn_target(model: nn.Module) -> tuple[nn.Module, object]:
    """The module whose config drives the decoder layers' attention (the language model for LLaVA)."""
    lm = model.get_decoder() if hasattr(model, "get_decoder") else model
    return lm, lm.config


@contextmanager
def kv_budget_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the language model's attention is ``"optspa_kvbudget"`` (sdpa for other caches)."""
    lm, cfg = _attn_target(model)
    before = cfg._attn_implementation
    lm.set_attn_implementation(ATTN_NAME)
    try:
        yield model
    finally:
        lm.set_attn_implementation(before)


# --------------------------------------------------------------------------------------------------------------
# Cache layer
# --------------------------------------------------------------------------------------------------------------
class EvictingKVLayer(CacheLayerMixin):
    """One decoder layer: per-KV-head kept tokens (ragged), each head stored by a ``QuantizedKVLayer``."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(
        self,
        layer_idx: int,
        budget: KVBudgetConfig,
        key_bits: int = OFF_BITS,
        value_bits: int = OFF_BITS,
        kv_config: KVQuantConfig | None = None,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.budget = budget
        self.window, self.kernel, self.pooling = budget.window, budget.kernel, budget.pooling
        self.key_bits, self.value_bits = key_bits, value_bits
        self.kv_config = kv_config or KVQuantConfig.uniform(OFF_BITS, 1)
        self.capture: list | None = None  # set by capture_prefill: receives (keys, values, window queries, scale)
        self.reset()

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(layer {self.layer_idx}, K{self.key_bits}/V{self.value_bits})"

    def reset(self) -> None:
        self.seen = 0
        self.heads: list[QuantizedKVLayer] = []
        self.lengths: list[int] = []  # tokens held per KV head
        self.kept_positions: list[torch.Tensor] | None = None  # per head [B, kept] after eviction
        self.awaiting_queries = False
        self._prefill: tuple[torch.Tensor, torch.Tensor] | None = None
        self.buf_k: torch.Tensor | None = None  # padded working copies [B, H, capacity, D]
        self.buf_v: torch.Tensor | None = None
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        heads = len(self.budget.capacities[self.layer_idx])
        if heads != key_states.shape[1]:
            raise ValueError(f"layer {self.layer_idx}: budget has {heads} KV heads, the model {key_states.shape[1]}")
        self.is_initialized = True

    # ---------------------------------------------------------------- state
    def is_exact(self) -> bool:
        """True while every head holds every token seen (no eviction happened): DynamicCache behaviour."""
        return all(n == self.seen for n in self.lengths) or self._prefill is not None

    def _new_head(self) -> QuantizedKVLayer:
        return QuantizedKVLayer(self.key_bits, self.value_bits, self.kv_config, keep_dequantized=True)

    # ---------------------------------------------------------------- update
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.awaiting_queries:
            raise RuntimeError("EvictionKVCache: the prefill attention did not run through 'optspa_kvbudget'; "
                               "wrap the model calls in kv_budget_attention(model)")
        first = not self.is_initialized
        if first:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[-2]
        self.seen += t
        _PENDING.layer = self
        if first:
            # keep the prefill until the attention hands over the queries; attention sees it exactly
            self._prefill = (key_states, value_states)
            self.awaiting_queries = True
            return key_states, value_states
        return self._append(key_states, value_states)

    def compress(self, query: torch.Tensor, scaling: float) -> None:
        """Called with the prefill queries: choose and store the kept tokens of every KV head."""
        keys, values = self._prefill
        self._prefill, self.awaiting_queries = None, False
        if self.capture is not None:
            self.capture[self.layer_idx] = (keys, values, query[:, :, -self.window :].clone(), scaling)
        t = keys.shape[-2]
        caps = self.budget.capacities_for(t)[self.layer_idx].tolist()
        if all(c >= t - min(self.window, t) for c in caps):
            kept = [torch.arange(t, device=keys.device).expand(keys.shape[0], -1)] * keys.shape[1]
        else:
            scores = snapkv_scores(query, keys, self.window, self.kernel, self.pooling, scaling)
            kept = select_kept(scores, caps, t)
        self.kept_positions = kept
        self.heads = [self._new_head() for _ in kept]
        self.lengths = [idx.shape[-1] for idx in kept]
        b, d = keys.shape[0], keys.shape[-1]
        self.buf_k = keys.new_zeros(b, len(kept), max(self.lengths) + 64, d)
        self.buf_v = torch.zeros_like(self.buf_k)
        for h, (idx, head) in enumerate(zip(kept, self.heads)):
            gather = idx[:, None, :, None].expand(-1, 1, -1, d)
            k_hist, v_hist = head.update(keys[:, h : h + 1].gather(2, gather), values[:, h : h + 1].gather(2, gather))
            self.buf_k[:, h, : idx.shape[-1]] = k_hist[:, 0]
            self.buf_v[:, h, : idx.shape[-1]] = v_hist[:, 0]

    def _grow(self, needed: int) -> None:
        cap = self.buf_k.shape[2]
        if needed <= cap:
            return
        new = max(needed, cap + cap // 2)
        pad = (0, 0, 0, new - cap)
        self.buf_k = nn.functional.pad(self.buf_k, pad)
        self.buf_v = nn.functional.pad(self.buf_v, pad)

    def _changed_from(self, length: int, bits: int, per_channel: bool) -> int:
        """First row of a head's returned history that may differ from the last call's (token rule of kvquant)."""
        if bits >= OFF_BITS:
            return length
        g = self.kv_config.token_group_size if per_channel else None
        return num_quantized_tokens(length, self.kv_config.residual, g)

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = key_states.shape[-2]
        self._grow(max(self.lengths) + t)
        per_channel = self.kv_config.per_channel_keys
        for h, head in enumerate(self.heads):
            n = self.lengths[h]
            k_hist, v_hist = head.update(key_states[:, h : h + 1], value_states[:, h : h + 1])
            k0 = self._changed_from(n, self.key_bits, per_channel)
            v0 = self._changed_from(n, self.value_bits, False)
            self.buf_k[:, h, k0 : n + t] = k_hist[:, 0, k0 : n + t]
            self.buf_v[:, h, v0 : n + t] = v_hist[:, 0, v0 : n + t]
            self.lengths[h] = n + t
        p = max(self.lengths)
        return self.buf_k[:, :, :p], self.buf_v[:, :, :p]

    def visibility(self, q_len: int) -> torch.Tensor:
        """Bool ``[1, kv_heads, q_len, max kept]``: slot ``s`` of head ``h`` visible to new query ``i``."""
        p = max(self.lengths)
        before = torch.tensor(self.lengths, device=self.device) - q_len  # held before this forward
        limit = before[:, None] + torch.arange(1, q_len + 1, device=self.device)[None, :]  # [H, q]
        return (torch.arange(p, device=self.device)[None, None, :] < limit[..., None]).unsqueeze(0)

    # ---------------------------------------------------------------- Cache layer API
    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # as DynamicLayer: exact layers use the model's mask; evicted layers build their own in the attention
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("EvictingKVLayer cannot be cropped")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("EvictingKVLayer does not support beam search")

    def offload(self) -> None:  # kept on its device
        pass

    def prefetch(self) -> None:
        pass

    def stored_tensors(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for head in self.heads:
            out += head.stored_tensors()
        if self._prefill is not None:
            out += list(self._prefill)
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stored_tensors())

    def workspace_nbytes(self) -> int:
        ws = sum(h.workspace_nbytes() for h in self.heads)
        for b in (self.buf_k, self.buf_v):
            ws += 0 if b is None else b.numel() * b.element_size()
        return ws

    def dequantized(self, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Head ``head``'s held K/V ``[B, 1, kept, D]`` as attention sees them."""
        n = self.lengths[head]
        return self.buf_k[:, head : head + 1, :n], self.buf_v[:, head : head + 1, :n]


# --------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------
class EvictionKVCache(Cache):
    """A ``transformers`` Cache of :class:`EvictingKVLayer` (per-KV-head budgets, optional per-layer bits)."""

    def __init__(self, budget: KVBudgetConfig, kv_config: KVQuantConfig | None = None) -> None:
        layers: list[CacheLayerMixin] = []
        for idx in range(budget.num_layers):
            kb, vb = kv_config.layer_bits(idx) if kv_config is not None else (OFF_BITS, OFF_BITS)
            layers.append(EvictingKVLayer(idx, budget, kb, vb, kv_config))
        super().__init__(layers=layers)
        self.budget, self.kv_config = budget, kv_config

    @classmethod
    def for_model(cls, model: nn.Module, budget: KVBudgetConfig, kv_config: KVQuantConfig | None = None
                  ) -> EvictionKVCache:
        num_layers, kv_heads, head_dim = kv_dims(model)
        budget.validate(num_layers, kv_heads)
        if kv_config is not None:
            kv_config.validate(num_layers, head_dim)
        return cls(budget, kv_config)

    @classmethod
    def from_prefill(cls, budget: KVBudgetConfig, states: list[tuple], kv_config: KVQuantConfig | None = None
                     ) -> EvictionKVCache:
        """A cache as if the prefill had run: ``states`` holds per layer ``(keys, values, window queries,
        scaling)`` as :func:`capture_prefill` returns them (so one prefill serves many budgets)."""
        cache = cls(budget, kv_config)
        for layer, (k, v, q, scaling) in zip(cache.layers, states, strict=True):
            layer.update(k, v)
            _PENDING.layer = None
            layer.compress(q, scaling)
        return cache

    def kept_lengths(self) -> list[list[int]]:
        return [list(layer.lengths) for layer in self.layers]

    def stored_tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for t in layer.stored_tensors()]

    def nbytes(self) -> int:
        """Stored bytes of the kept tokens: packed codes, fp16 scales/zeros, full-precision windows (no workspace)."""
        return sum(layer.nbytes() for layer in self.layers)

    def workspace_nbytes(self) -> int:
        return sum(layer.workspace_nbytes() for layer in self.layers)


def capture_prefill(
    model: nn.Module, input_ids: torch.Tensor, window: int, **model_kwargs
) -> tuple[list, torch.Tensor]:
    """Run one prefill with a keep-everything eviction cache and return per layer ``(keys, values, last-window
    queries, scaling)`` plus the logits; :meth:`EvictionKVCache.from_prefill` rebuilds any budget from them."""
    num_layers, kv_heads, _ = kv_dims(model)
    cache = EvictionKVCache(keep_all_budget(num_layers, kv_heads, window))
    captured: list = [None] * num_layers
    for layer in cache.layers:
        layer.capture = captured
    with torch.inference_mode(), kv_budget_attention(model):
        logits = model(input_ids, past_key_values=cache, use_cache=True, **model_kwargs).logits
    return captured, logits




# --------------------------------------------------------------------------------------------------------------
# Continuation quality: prefill once, then score a teacher-forced continuation with any number of caches
# --------------------------------------------------------------------------------------------------------------
def keep_all_budget(num_layers: int, num_kv_heads: int, window: int = 32) -> KVBudgetConfig:
    """A budget that never evicts (each head keeps every token): the full cache in this cache class."""
    return KVBudgetConfig(budget=0, capacities=[[1 << 30] * num_kv_heads] * num_layers, window=window,
                          source="full")


def dynamic_cache_from_prefill(states: list[tuple], config=None) -> DynamicCache:
    """A plain ``DynamicCache`` holding the captured prefill K/V (the full-cache reference)."""
    cache = DynamicCache(config=config)
    for idx, (k, v, _, _) in enumerate(states):
        cache.update(k, v, idx)
    return cache


def cache_nbytes(cache: Cache) -> int:
    """Stored bytes of any of this tool's caches, or of a DynamicCache (its K/V tensors)."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for l in cache.layers for t in (l.keys, l.values) if t is not None)


@torch.inference_mode()
def continuation_nll(
    model: nn.Module,
    segment: torch.Tensor,
    prefill_len: int,
    caches: dict[str, Callable[[list], Cache]],
    window: int = 32,
) -> dict[str, dict]:
    """Prefill ``segment[:, :prefill_len]`` once (full attention), then for every ``caches[name](states)`` score the
    rest of the segment teacher-forced in one forward through that cache.  The first continuation token is
    predicted by the prefill (identical for all caches).  Returns per name ``{"nll": summed negative
    log-likelihood (float64), "tokens": scored tokens, "nbytes": cache bytes after the prefill}``."""
    if not 0 < prefill_len < segment.shape[1] - 1:
        raise ValueError(f"prefill length {prefill_len} must leave at least 2 tokens of a "
                         f"{segment.shape[1]}-token segment")
    states, logits = capture_prefill(model, segment[:, :prefill_len], window)
    first = nn.functional.cross_entropy(logits[0, -1:].double(), segment[0, prefill_len : prefill_len + 1],
                                        reduction="sum")
    out: dict[str, dict] = {}
    targets = segment[0, prefill_len + 1 :]
    for name, make in caches.items():
        cache = make(states)
        nbytes = cache_nbytes(cache)
        with kv_budget_attention(model):
            lg = model(segment[:, prefill_len:-1], past_key_values=cache, use_cache=True).logits[0]
        nll = first + nn.functional.cross_entropy(lg.double(), targets, reduction="sum")
        out[name] = {"nll": float(nll), "tokens": int(targets.numel()) + 1, "nbytes": nbytes}
    return out


def evaluate_budget(
    model: nn.Module,
    tokens: torch.Tensor,
    budget: KVBudgetConfig,
    kv_config: KVQuantConfig | None = None,
    prefill: int = 2048,
    continuation: int = 256,
    segments: int = 4,
) -> dict:
    """Continuation perplexity (see :func:`continuation_nll`) over ``segments`` evenly spaced disjoint spans of
    ``tokens [1, N]``: the full cache and ``budget`` (with ``kv_config`` bits), pooled over spans, and the mean
    stored bytes after the prefill against a float16 full cache."""
    span = prefill + continuation
    n = tokens.shape[1]
    if n < span * segments:
        raise ValueError(f"{n} evaluation tokens cannot hold {segments} spans of {prefill}+{continuation}")
    num_layers, kv_heads, head_dim = kv_dims(model)
    budget.validate(num_layers, kv_heads)
    stride = (n - span) // max(segments - 1, 1)
    makers = {"full": dynamic_cache_from_prefill,
              "budget": lambda st: EvictionKVCache.from_prefill(budget, st, kv_config=kv_config)}
    device = next(model.parameters()).device
    totals = {k: [0.0, 0, 0] for k in makers}
    for i in range(segments):
        seg = tokens[:, i * stride : i * stride + span].to(device)
        for name, r in continuation_nll(model, seg, prefill, makers, window=budget.window).items():
            totals[name][0] += r["nll"]
            totals[name][1] += r["tokens"]
            totals[name][2] += r["nbytes"]
    fp16 = 2 * 2 * num_layers * kv_heads * head_dim * prefill
    out = {"prefill": prefill, "continuation": continuation, "segments": segments, "fp16_full_bytes": fp16,
           "budget": budget.to_dict(), "kv": None if kv_config is None else kv_config.to_dict()}
    for name, (nll, ntok, nbytes) in totals.items():
        out[f"ppl_{name}"] = float(torch.tensor(nll / ntok).exp())
        out[f"nbytes_{name}"] = nbytes / segments
    out["ratio_to_fp16_full"] = out["nbytes_budget"] / fp16
    return out


__all__ = ["ATTN_NAME", "EvictingKVLayer", "EvictionKVCache", "cache_nbytes", "capture_prefill", "continuation_nll",
           "dynamic_cache_from_prefill", "evaluate_budget", "keep_all_budget", "kv_budget_attention",
           "kvbudget_attention_forward"]
