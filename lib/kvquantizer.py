"""The one KV quantizer: asymmetric uniform integer codes with float16 scale/zero per group, per token
(along the head dimension) or per channel (over token groups), and its fake-quantization helpers."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .kvconfig import OFF_BITS, KVQuantConfig, num_quantized_tokens

_FP16_MAX = float(torch.finfo(torch.float16).max)


class QuantizedChunk(NamedTuple):
    """Codes in the natural ``[..., T, D]`` layout (uint8) and the group parameters (float16)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


# 0-dim CPU tensors broadcast against tensors on any device
_NEG_INF16 = torch.tensor(float("-inf"), dtype=torch.float16)
_POS_INF16 = torch.tensor(float("inf"), dtype=torch.float16)
_FP16_TINY = 2.0**-24  # smallest positive float16 (subnormal)


def _fp16_directed(x: torch.Tensor, up: bool, low: float = -_FP16_MAX) -> torch.Tensor:
    """Round float32 ``x`` (clamped to ``[low, fp16 max]``) to float16, towards +inf if ``up`` else towards -inf
    (so the grid covers the group)."""
    x = x.clamp(low, _FP16_MAX)
    h = x.to(torch.float16)
    if up:
        return torch.where(h.float() < x, torch.nextafter(h, _POS_INF16), h)
    return torch.where(h.float() > x, torch.nextafter(h, _NEG_INF16), h)


def _quantize_along(x: torch.Tensor, bits: int, dim: int) -> tuple[QuantizedChunk, torch.Tensor]:
    """Min/max quantization of float32 ``x`` with groups spanning dimension ``dim`` (params keep that dim as 1).

    Also returns the float32 dequantization, computed exactly as the ``dequantize_*`` functions do."""
    qmax = (1 << bits) - 1
    # amin + amax: torch.aminmax takes milliseconds on tiny inputs on a busy CPU (OpenMP waits)
    mn, mx = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    zero = _fp16_directed(mn, up=False)
    zf = zero.float()
    # a zero range only happens when every element equals zf, which gets code 0 whatever the positive scale
    scale = _fp16_directed((mx - zf) / qmax, up=True, low=_FP16_TINY)
    sf = scale.float()
    qf = (x - zf).div_(sf).round_().clamp_(0, qmax)
    codes = qf.to(torch.uint8)
    deq = qf.mul_(sf).add_(zf)  # qf holds exact integers, so this equals codes.float() * sf + zf
    return QuantizedChunk(codes, scale, zero), deq


def _quantize_token(x: torch.Tensor, bits: int, group_size: int) -> tuple[QuantizedChunk, torch.Tensor]:
    d = x.shape[-1]
    xf = x.float().unflatten(-1, (d // group_size, group_size))
    q, deq = _quantize_along(xf, bits, dim=-1)
    return QuantizedChunk(q.codes.flatten(-2), q.scale.squeeze(-1), q.zero.squeeze(-1)), deq.flatten(-2)


def _quantize_channel(x: torch.Tensor, bits: int, token_group_size: int) -> tuple[QuantizedChunk, torch.Tensor]:
    t = x.shape[-2]
    if t % token_group_size:
        raise ValueError(f"{t} tokens is not a whole number of key groups of {token_group_size}")
    xf = x.float().unflatten(-2, (t // token_group_size, token_group_size))
    q, deq = _quantize_along(xf, bits, dim=-2)
    return QuantizedChunk(q.codes.flatten(-3, -2), q.scale.squeeze(-2), q.zero.squeeze(-2)), deq.flatten(-3, -2)


def quantize_token_groups(x: torch.Tensor, bits: int, group_size: int) -> QuantizedChunk:
    """Per-token quantization of ``x [..., T, D]`` in groups of ``group_size`` along D.

    Returns codes ``[..., T, D]`` and scale/zero ``[..., T, D // group_size]``.
    """
    return _quantize_token(x, bits, group_size)[0]


def _dequantize_along(chunk: QuantizedChunk, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """codes * scale + zero in float32, groups along ``dim`` (-1: head dimension, -2: tokens)."""
    ngroups = chunk.scale.shape[dim]
    codes = chunk.codes.unflatten(dim, (ngroups, -1)).float()
    out = codes * chunk.scale.float().unsqueeze(dim) + chunk.zero.float().unsqueeze(dim)
    return out.flatten(dim - 1, dim).to(dtype)


def dequantize_token_groups(chunk: QuantizedChunk, dtype: torch.dtype) -> torch.Tensor:
    return _dequantize_along(chunk, -1, dtype)


def quantize_channel_groups(x: torch.Tensor, bits: int, token_group_size: int) -> QuantizedChunk:
    """Per-channel quantization of ``x [..., n*G, D]``: each block of ``G`` tokens shares a range per channel.

    Returns codes ``[..., n*G, D]`` and scale/zero ``[..., n, D]``.
    """
    return _quantize_channel(x, bits, token_group_size)[0]


def dequantize_channel_groups(chunk: QuantizedChunk, dtype: torch.dtype) -> torch.Tensor:
    return _dequantize_along(chunk, -2, dtype)


def _quantize_rows(x: torch.Tensor, bits: int, per_channel: bool,
                   config: KVQuantConfig) -> tuple[QuantizedChunk, torch.Tensor]:
    """The one quantizer of a K or V stream (simulation and real cache both call it, so they agree bitwise)."""
    if per_channel:
        return _quantize_channel(x, bits, config.token_group_size)
    return _quantize_token(x, bits, config.group_size)


def fake_quantize_stream(
    x: torch.Tensor, bits: int, per_channel: bool, config: KVQuantConfig
) -> torch.Tensor:
    """Quantize-dequantize ``x [..., T, D]`` following the token rule at ``T``; the rest is returned as is."""
    if bits >= OFF_BITS:
        return x
    t = x.shape[-2]
    g = config.token_group_size if per_channel else None
    nq = num_quantized_tokens(t, config.residual, g)
    if nq == 0:
        return x
    head = x if nq == t else x[..., :nq, :]
    deq = _quantize_rows(head, bits, per_channel, config)[1].to(x.dtype)
    if nq == t:
        return deq
    return torch.cat([deq, x[..., nq:, :]], dim=-2)


def fake_quantize_kv(
    keys: torch.Tensor,
    values: torch.Tensor,
    key_bits: int,
    value_bits: int,
    config: KVQuantConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize-dequantize one layer's ``[B, H, T, D]`` K/V exactly as ``PackedQuantizedCache`` holding T tokens."""
    return (
        fake_quantize_stream(keys, key_bits, config.per_channel_keys, config),
        fake_quantize_stream(values, value_bits, False, config),
    )
