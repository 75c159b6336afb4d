"""Bit packing of 2..8-bit integer codes into uint8 bytes (dense, no padding inside a run)."""
from __future__ import annotations

import math

import torch

from .kvconfig import QUANT_BITS


def _pack_geometry(bits: int) -> tuple[int, int]:
    """Smallest run of codes that fills whole bytes: (codes per run, bytes per run)."""
    if bits not in QUANT_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes; supported: {list(QUANT_BITS)}")
    per_run = 8 // math.gcd(bits, 8)
    return per_run, per_run * bits // 8


def packed_size(n: int, bits: int) -> int:
    """Bytes used by ``n`` codes of ``bits`` bits, densely packed."""
    return (n * bits + 7) // 8


_SHIFTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _pack_plan(bits: int, device: torch.device) -> tuple[int, int, torch.dtype, torch.Tensor, torch.Tensor]:
    """(codes per run, bytes per run, word dtype, code shifts, byte shifts), shift tensors cached per device."""
    per_run, run_bytes = _pack_geometry(bits)
    # a run is at most 8 codes x 5 bits = 40 bits; int32 suffices below 32 bits
    wdtype = torch.int32 if per_run * bits < 32 else torch.int64
    key = (bits, str(device))
    if key not in _SHIFTS:
        _SHIFTS[key] = (
            torch.arange(per_run, device=device, dtype=wdtype) * bits,
            torch.arange(run_bytes, device=device, dtype=wdtype) * 8,
        )
    return (per_run, run_bytes, wdtype, *_SHIFTS[key])


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (< 2**bits) along the last dim into uint8, little-endian bit order, no padding
    beyond the final byte: ``[..., n] -> [..., ceil(n * bits / 8)]``."""
    per_run, run_bytes, wdtype, shifts, byte_shifts = _pack_plan(bits, codes.device)
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    lead, n = codes.shape[:-1], codes.shape[-1]
    c = codes.to(wdtype)
    pad = (-n) % per_run
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*lead, -1, per_run)
    words = (c << shifts).sum(-1, dtype=wdtype)  # fields are disjoint, so sum == bitwise or
    out = ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(*lead, -1)
    nbytes = packed_size(n, bits)
    if out.shape[-1] != nbytes:
        out = out[..., :nbytes].contiguous()  # trailing bytes hold only padding zeros
    return out


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``[..., ceil(n * bits / 8)] uint8 -> [..., n] uint8`` codes."""
    per_run, run_bytes, wdtype, shifts, byte_shifts = _pack_plan(bits, packed.device)
    if packed.shape[-1] != packed_size(n, bits):
        raise ValueError(f"{packed.shape[-1]} bytes cannot hold exactly {n} codes of {bits} bits")
    if bits == 8:
        return packed
    lead = packed.shape[:-1]
    runs = -(-n // per_run)
    p = packed.to(wdtype)
    missing = runs * run_bytes - p.shape[-1]
    if missing:
        p = torch.nn.functional.pad(p, (0, missing))
    p = p.reshape(*lead, runs, run_bytes)
    words = (p << byte_shifts).sum(-1, dtype=wdtype)
    codes = ((words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(*lead, -1)
    return codes[..., :n].to(torch.uint8)
