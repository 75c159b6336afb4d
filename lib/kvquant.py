"""KV-cache quantization: one quantizer, a simulation mode (forward hooks) and a real packed cache.

Quantizer
---------
Asymmetric uniform integer quantization with ``bits`` in {2, 3, 4, 5, 6, 8}; ``16`` means "off" (kept in the
model's dtype).  Each group stores a float16 ``scale`` and a float16 ``zero`` (the group minimum, rounded *down*
to float16, so that ``[zero, zero + scale * (2**bits - 1)]`` always covers the group; the scale is rounded *up*
for the same reason).  Codes are ``round((x - zero) / scale)`` clamped to ``[0, 2**bits - 1]``; dequantization
is ``code * scale + zero``.  All arithmetic is float32, so the round-off error is at most ``scale / 2`` (values
beyond the float16 range, +-65504, are clipped).

Grouping schemes (``KVQuantConfig.scheme``)
-------------------------------------------
* ``"kivi"`` (default): keys per channel -- ``token_group_size`` consecutive tokens share a min/max for each
  channel (outlier channels of post-RoPE keys get their own range); values per token -- ``group_size``
  consecutive elements along the head dimension share a min/max.
* ``"per_token"``: keys and values both per token along the head dimension (for comparison; collapses at low
  bits because of key outlier channels).

Token rule (identical in simulation and in the real cache), for a sequence of ``T`` tokens and ``R = residual``:

* kivi keys: tokens are split into groups of ``token_group_size`` aligned from token 0.  A group is quantized
  once it is complete AND entirely older than the ``R`` most recent tokens, i.e. the first
  ``G * floor(max(T - R, 0) / G)`` tokens are quantized; the rest stay full precision.
* values (and per_token keys): token ``t`` is quantized once it is older than the ``R`` most recent tokens,
  i.e. the first ``max(T - R, 0)`` tokens are quantized.

A token, once quantized, is never re-quantized: its codes depend only on its own group's values.

Simulation vs real cache
------------------------
``simulate_kv_quant(model, cfg)`` hooks every decoder layer's ``self_attn`` and hands it a throw-away cache whose
``update`` returns quantize-dequantized post-RoPE K/V following the rule above for the ``T`` tokens of that call
(one forward pass; works with ``use_cache=False``, LLaVA and layer-by-layer runners).  If a plain ``DynamicCache``
is being passed (generation), the hook wraps it: the full-precision history is stored as usual and the K/V
handed to attention are quantize-dequantized with the rule at the current length -- bit-for-bit what
``PackedQuantizedCache`` returns, so generation under the hooks equals generation with the real cache.  A
``PackedQuantizedCache`` passed while hooks are active is left alone (it already quantizes); any other cache type
is left alone with a warning.  A layer-by-layer runner should capture the layer kwargs from a ``use_cache=False``
forward (a captured ``DynamicCache`` would be wrapped and keep growing across calls).

Note that a single forward over a prefix of length ``T`` (how perplexity is measured) applies the rule at ``T``
to every query position, while incremental decoding computed the deeper layers' K/V of older tokens at the time
they were processed (when some were still in the full-precision window).  Both see the same layer-0 K/V at the
last position; deeper layers differ slightly, which is the usual KIVI sim/real gap.

Real cache
----------
``PackedQuantizedCache(cfg)`` is a ``transformers`` ``Cache`` of ``QuantizedKVLayer`` (``DynamicLayer`` for layers
with 16/16 bits).  It stores bit-packed uint8 codes + float16 scales/zeros + the full-precision window and returns
dequantized K/V.  ``nbytes()`` counts exactly those stored tensors.  By default (``keep_dequantized=False``) it
holds only that packed storage, which is the memory saving, and dequantizes the whole cache at each decode step.
``keep_dequantized=True`` is a speed mode: it also keeps a dequantized working copy so that a decode step costs
O(1) quantization work (CPU has no fused dequant-attention kernel); that copy saves no memory, is reported by
``workspace_nbytes()`` and is not part of ``nbytes()``.

Layout
------
This module is the public facade; the code lives in small modules that each do one job:
``lib.kvconfig`` (settings, token rule, ``kv_dims``), ``lib.kvquantizer`` (the quantizer), ``lib.bitpack``
(bit packing), ``lib.kvsim`` (simulation hooks), ``lib.kvcache`` (the packed cache) and ``lib.kvmemory``
(memory accounting). Import from here; the names below are the stable API.
"""

from __future__ import annotations

from .bitpack import pack_bits, packed_size, unpack_bits
from .kvcache import PackedQuantizedCache, QuantizedKVLayer
from .kvconfig import OFF_BITS, QUANT_BITS, SCHEMES, SUPPORTED_BITS, KVQuantConfig, kv_dims, num_quantized_tokens
from .kvmemory import fp16_kv_bytes_per_token, kv_bytes_per_token, kv_memory_report
from .kvquantizer import (
    QuantizedChunk,
    dequantize_channel_groups,
    dequantize_token_groups,
    fake_quantize_kv,
    fake_quantize_stream,
    quantize_channel_groups,
    quantize_token_groups,
)
from .kvsim import active_kv_simulation, simulate_kv_quant

__all__ = [
    "QUANT_BITS",
    "OFF_BITS",
    "SUPPORTED_BITS",
    "SCHEMES",
    "KVQuantConfig",
    "QuantizedChunk",
    "num_quantized_tokens",
    "quantize_token_groups",
    "dequantize_token_groups",
    "quantize_channel_groups",
    "dequantize_channel_groups",
    "fake_quantize_stream",
    "fake_quantize_kv",
    "packed_size",
    "pack_bits",
    "unpack_bits",
    "kv_dims",
    "simulate_kv_quant",
    "active_kv_simulation",
    "QuantizedKVLayer",
    "PackedQuantizedCache",
    "kv_bytes_per_token",
    "fp16_kv_bytes_per_token",
    "kv_memory_report",
]
