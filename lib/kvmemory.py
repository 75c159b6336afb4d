"""Analytic KV-cache memory: stored bytes per token of a configuration, against float16."""
from __future__ import annotations

from torch import nn

from .bitpack import packed_size
from .kvconfig import OFF_BITS, KVQuantConfig, kv_dims


def kv_bytes_per_token(config: KVQuantConfig, num_kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> float:
    """Steady-state stored bytes per token over all layers (the residual window amortises to zero).

    ``dtype_bytes`` is the size of an unquantized element (16-bit layers)."""
    total = 0.0
    for kb, vb in zip(config.key_bits, config.value_bits, strict=True):
        for bits, per_channel in ((kb, config.per_channel_keys), (vb, False)):
            if bits >= OFF_BITS:
                total += head_dim * dtype_bytes
            elif per_channel:  # a scale+zero pair per channel per token group
                total += head_dim * bits / 8 + 4 * head_dim / config.token_group_size
            else:  # a scale+zero pair per head-dim group per token
                total += packed_size(head_dim, bits) + 4 * head_dim / config.group_size
    return total * num_kv_heads


def fp16_kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """Float16 reference: K and V, 2 bytes per element."""
    return 2 * 2 * num_layers * num_kv_heads * head_dim


def kv_memory_report(config: KVQuantConfig | None, model: nn.Module, dtype_bytes: int = 2) -> dict:
    """``{"kv_bytes_per_token", "fp16_bytes_per_token", "ratio_to_fp16"}`` for logging."""
    num_layers, kv_heads, head_dim = kv_dims(model)
    ref = fp16_kv_bytes_per_token(num_layers, kv_heads, head_dim)
    if config is None:
        cfg = KVQuantConfig.uniform(OFF_BITS, num_layers)
    else:
        cfg = config
    bpt = kv_bytes_per_token(cfg, kv_heads, head_dim, dtype_bytes=dtype_bytes)
    return {"kv_bytes_per_token": bpt, "fp16_bytes_per_token": ref, "ratio_to_fp16": bpt / ref}
