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
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer

from .models import decoder_layers, text_config

logger = logging.getLogger(__name__)

QUANT_BITS = (2, 3, 4, 5, 6, 8)
OFF_BITS = 16
SUPPORTED_BITS = (*QUANT_BITS, OFF_BITS)
SCHEMES = ("kivi", "per_token")
_FP16_MAX = float(torch.finfo(torch.float16).max)
# quantized rows (tokens, or key groups) merged into one stored segment; decode steps append without copying
_SEGMENT_ROWS = 64


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------
@dataclass
class KVQuantConfig:
    """Per-layer KV-cache quantization settings.

    ``group_size``: elements per group along the head dimension (values; keys too in ``per_token``); must divide
    head_dim.  ``token_group_size``: tokens per key group in ``kivi`` (64 keeps scale overhead under 0.05x of
    float16 at head_dim 32).  ``residual``: most recent tokens kept in full precision.
    """

    key_bits: list[int]
    value_bits: list[int]
    group_size: int = 32
    token_group_size: int = 64
    residual: int = 0
    scheme: str = "kivi"

    def __post_init__(self) -> None:
        self.key_bits = [int(b) for b in self.key_bits]
        self.value_bits = [int(b) for b in self.value_bits]

    @property
    def per_channel_keys(self) -> bool:
        """kivi quantizes keys per channel over token groups; per_token quantizes them like values."""
        return self.scheme == "kivi"

    @classmethod
    def uniform(cls, bits: int, num_layers: int, value_bits: int | None = None, **kwargs) -> KVQuantConfig:
        """Same ``bits`` for every layer (``value_bits`` defaults to ``bits``)."""
        vb = bits if value_bits is None else value_bits
        return cls(key_bits=[bits] * num_layers, value_bits=[vb] * num_layers, **kwargs)

    @classmethod
    def half_half(cls, first: int, second: int, num_layers: int, **kwargs) -> KVQuantConfig:
        """First half of the layers at ``first`` bits, the rest at ``second`` bits (keys and values)."""
        half = num_layers // 2
        bits = [first] * half + [second] * (num_layers - half)
        return cls(key_bits=list(bits), value_bits=list(bits), **kwargs)

    @classmethod
    def from_profile(cls, profile: "str | Profile", num_layers: int | None = None, **kwargs) -> KVQuantConfig:
        """Build from the tool's one profile format (a :class:`lib.profile.Profile` or its JSON file, as the
        search writes it: ``"kv_bits": {"key": [...], "value": [...]}``) or an inline spec: comma-separated
        items ``K[/V][xN]``, e.g. ``"8x4,6x4"`` (4 layers at 8 bits then 4 at 6) or ``"4/2x8"``."""
        from .profile import Profile, load_profile

        if isinstance(profile, str) and (os.path.isfile(profile) or profile.endswith(".json")):
            profile = load_profile(profile, num_layers)
        if isinstance(profile, Profile):
            if profile.key_bits is None:
                raise ValueError("the profile has no KV bits (its kv_bits entry is null)")
            cfg = cls(key_bits=list(profile.key_bits),
                      value_bits=list(profile.value_bits if profile.value_bits is not None else profile.key_bits),
                      **kwargs)
        else:
            key_bits, value_bits = _parse_inline_profile(str(profile))
            cfg = cls(key_bits=key_bits, value_bits=value_bits, **kwargs)
        if num_layers is not None and len(cfg.key_bits) != num_layers:
            raise ValueError(f"KV profile has {len(cfg.key_bits)} layers, model has {num_layers} decoder layers")
        return cfg

    @classmethod
    def from_cli(
        cls,
        num_layers: int,
        kv_bits: int | None = None,
        kv_profile: str | None = None,
        **kwargs,
    ) -> KVQuantConfig | None:
        """Map ``--kv_bits`` / ``--kv_profile`` to a config; ``None`` when KV quantization is off."""
        if kv_bits is not None and kv_profile is not None:
            raise ValueError("give either --kv_bits or --kv_profile, not both")
        if kv_profile is not None:
            cfg = cls.from_profile(kv_profile, num_layers=num_layers, **kwargs)
        elif kv_bits is not None:
            cfg = cls.uniform(int(kv_bits), num_layers, **kwargs)
        else:
            return None
        return None if cfg.is_off() else cfg

    def validate(self, num_layers: int, head_dim: int) -> KVQuantConfig:
        """Raise ``ValueError`` (one-line message) if the config does not fit the model; return self."""
        for name, bits in (("key_bits", self.key_bits), ("value_bits", self.value_bits)):
            bad = sorted({b for b in bits if b not in SUPPORTED_BITS})
            if bad:
                raise ValueError(f"{name} {bad} not supported; choose from {list(SUPPORTED_BITS)}")
            if len(bits) != num_layers:
                raise ValueError(f"{name} has {len(bits)} entries but the model has {num_layers} decoder layers")
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown KV quant scheme {self.scheme!r}; choose from {list(SCHEMES)}")
        if self.group_size <= 0 or head_dim % self.group_size != 0:
            raise ValueError(f"group_size {self.group_size} must be positive and divide head_dim {head_dim}")
        if self.token_group_size <= 0:
            raise ValueError(f"token_group_size must be positive, got {self.token_group_size}")
        if self.residual < 0:
            raise ValueError(f"residual must be >= 0, got {self.residual}")
        return self

    def is_off(self) -> bool:
        return all(b >= OFF_BITS for b in (*self.key_bits, *self.value_bits))

    def layer_bits(self, layer_idx: int) -> tuple[int, int]:
        return self.key_bits[layer_idx], self.value_bits[layer_idx]

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """Compact one-line summary for logs."""
        if len(set(self.key_bits)) == 1 and self.key_bits == self.value_bits:
            bits = f"{self.key_bits[0]}b"
        else:
            bits = f"K={self.key_bits} V={self.value_bits}"
        return (
            f"kv[{bits} scheme={self.scheme} group={self.group_size} "
            f"token_group={self.token_group_size} residual={self.residual}]"
        )


def _parse_inline_profile(spec: str) -> tuple[list[int], list[int]]:
    key_bits: list[int] = []
    value_bits: list[int] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        m = re.fullmatch(r"(\d+)(?:/(\d+))?(?:[x*](\d+))?", item)
        if m is None:
            raise ValueError(f"bad KV profile item {item!r}; expected K[/V][xN], e.g. 8x4 or 4/2x8")
        kb = int(m.group(1))
        vb = int(m.group(2)) if m.group(2) else kb
        n = int(m.group(3)) if m.group(3) else 1
        key_bits += [kb] * n
        value_bits += [vb] * n
    if not key_bits:
        raise ValueError(f"empty KV profile {spec!r}")
    return key_bits, value_bits


# --------------------------------------------------------------------------------------------------------------
# Token rule
# --------------------------------------------------------------------------------------------------------------
def num_quantized_tokens(seq_len: int, residual: int, token_group_size: int | None = None) -> int:
    """How many leading tokens are quantized out of ``seq_len`` (see the module docstring)."""
    avail = max(seq_len - residual, 0)
    if token_group_size:
        return (avail // token_group_size) * token_group_size
    return avail


# --------------------------------------------------------------------------------------------------------------
# Quantizer
# --------------------------------------------------------------------------------------------------------------
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


def _quantize_rows(x: torch.Tensor, bits: int, per_channel: bool, config: KVQuantConfig) -> tuple[QuantizedChunk, torch.Tensor]:
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


# --------------------------------------------------------------------------------------------------------------
# Bit packing
# --------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------
# Model helpers
# --------------------------------------------------------------------------------------------------------------
def kv_dims(model: nn.Module) -> tuple[int, int, int]:
    """(num decoder layers, num KV heads, head_dim): the layers the hooks and caches see, heads from the text config."""
    cfg = text_config(model)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return len(decoder_layers(model)), kv_heads, head_dim


# --------------------------------------------------------------------------------------------------------------
# Simulation mode
# --------------------------------------------------------------------------------------------------------------
class _FakeQuantCache:
    """Stands in for ``past_key_values`` during one attention call: ``update`` returns quantize-dequantized K/V.

    With ``inner`` (a plain DynamicCache), the full-precision states are stored there first and the whole
    returned history is quantized with the rule at its current length, as the real cache would.
    """

    def __init__(self, key_bits: int, value_bits: int, config: KVQuantConfig, inner: Cache | None = None):
        self._bits = (key_bits, value_bits)
        self._config = config
        self._inner = inner

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self._inner is not None:
            key_states, value_states = self._inner.update(key_states, value_states, layer_idx, *args, **kwargs)
        return fake_quantize_kv(key_states, value_states, *self._bits, self._config)

    def __getattr__(self, name: str):
        inner = self.__dict__.get("_inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)


def _wraps_plain_dynamic(cache: object, layer_idx: int) -> bool:
    if not isinstance(cache, DynamicCache):
        return False
    return layer_idx >= len(cache.layers) or type(cache.layers[layer_idx]) is DynamicLayer


def _make_sim_hook(layer_idx: int, key_bits: int, value_bits: int, config: KVQuantConfig, warned: set) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        cache = kwargs.get("past_key_values")
        if cache is None:
            kwargs["past_key_values"] = _FakeQuantCache(key_bits, value_bits, config)
        elif isinstance(cache, PackedQuantizedCache):
            pass  # already quantizes for real
        elif _wraps_plain_dynamic(cache, layer_idx):
            kwargs["past_key_values"] = _FakeQuantCache(key_bits, value_bits, config, inner=cache)
        elif type(cache) not in warned:
            warned.add(type(cache))
            logger.warning("simulate_kv_quant: %s passed to attention; KV left unquantized", type(cache).__name__)
        return args, kwargs

    return hook


@contextmanager
def simulate_kv_quant(model: nn.Module, config: KVQuantConfig | None) -> Iterator[KVQuantConfig | None]:
    """Within the block, every forward of ``model`` (or of its decoder layers called one by one) sees
    quantize-dequantized K/V.  Hooks are removed on exit, also on exception.  ``config=None`` is a no-op."""
    if config is None:
        yield None
        return
    layers = decoder_layers(model)
    _, _, head_dim = kv_dims(model)
    config.validate(len(layers), head_dim)
    handles = []
    warned: set = set()
    try:
        for idx, layer in enumerate(layers):
            kb, vb = config.layer_bits(idx)
            if kb >= OFF_BITS and vb >= OFF_BITS:
                continue
            attn = layer.self_attn
            if getattr(attn, "layer_idx", idx) != idx:
                logger.warning("decoder layer %d has self_attn.layer_idx=%s", idx, attn.layer_idx)
            hook = _make_sim_hook(idx, kb, vb, config, warned)
            handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
        logger.info("KV quant simulation on %d/%d layers: %s", len(handles), len(layers), config.describe())
        yield config
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------------------------
# Real mode
# --------------------------------------------------------------------------------------------------------------
class _PackedStream:
    """Storage for one of K or V of one layer: packed codes + fp16 scale/zero + full-precision window.

    Quantized rows (tokens, or key groups in kivi) are kept as ``[packed, scale, zero]`` entries: a decode step
    appends one small entry (no copy of the cache), and every ``_SEGMENT_ROWS`` rows the open entries are
    concatenated into one closed segment, so the number of tensors stays small."""

    def __init__(self, bits: int, per_channel: bool, config: KVQuantConfig, keep_dequantized: bool):
        self.bits = bits
        self.per_channel = per_channel
        self.config = config
        self.group_size = config.group_size
        self.token_group_size = config.token_group_size
        self.residual = config.residual
        self.keep_dequantized = keep_dequantized and bits < OFF_BITS
        self.reset()

    def reset(self) -> None:
        self.length = 0
        self.n_quant = 0
        self.head_dim: int | None = None
        self.fp: torch.Tensor | None = None  # tokens [n_quant, length), model dtype
        # packed: kivi keys [B,H,groups,G*D*b/8], else [B,H,tokens,ceil(D*b/8)] uint8;
        # scale/zero fp16: kivi keys [B,H,groups,D], else [B,H,tokens,D/g]
        self.closed: list[list[torch.Tensor]] = []
        self.open: list[list[torch.Tensor]] = []
        self.open_rows = 0
        self.buf: torch.Tensor | None = None  # dequantized workspace [B,H,capacity,D]
        self._empty: torch.Tensor | None = None  # reused zero-length window

    def _target(self) -> int:
        g = self.token_group_size if self.per_channel else None
        return num_quantized_tokens(self.length, self.residual, g)

    def _quantize(self, x: torch.Tensor) -> tuple[QuantizedChunk, torch.Tensor]:
        return _quantize_rows(x, self.bits, self.per_channel, self.config)

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        if self.per_channel:  # one packed row per token group, so a group is one contiguous run of bytes
            codes = codes.unflatten(-2, (-1, self.token_group_size)).flatten(-2)
        return pack_bits(codes, self.bits)

    def _store(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self.open.append([packed, scale, zero])
        self.open_rows += packed.shape[-2]
        if self.open_rows >= _SEGMENT_ROWS:
            entries = self.open
            merged = entries[0] if len(entries) == 1 else [torch.cat(p, dim=-2) for p in zip(*entries)]
            self.closed.append(merged)
            self.open, self.open_rows = [], 0

    def _stored(self, i: int) -> torch.Tensor:
        parts = [entry[i] for entry in (*self.closed, *self.open)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)

    @property
    def packed(self) -> torch.Tensor:
        return self._stored(0)

    @property
    def scale(self) -> torch.Tensor:
        return self._stored(1)

    @property
    def zero(self) -> torch.Tensor:
        return self._stored(2)

    def unpacked_codes(self) -> torch.Tensor:
        """All stored codes in the natural ``[B, H, n_quant, D]`` layout."""
        d = self.head_dim
        if self.per_channel:
            codes = unpack_bits(self.packed, self.bits, self.token_group_size * d)
            return codes.unflatten(-1, (self.token_group_size, d)).flatten(-3, -2)
        return unpack_bits(self.packed, self.bits, d)

    def dequantize_stored(self, dtype: torch.dtype) -> torch.Tensor:
        """Dequantize the packed part from storage (unpack + scale/zero)."""
        chunk = QuantizedChunk(self.unpacked_codes(), self.scale, self.zero)
        return _dequantize_along(chunk, -2 if self.per_channel else -1, dtype)

    def _ensure_capacity(self, like: torch.Tensor) -> None:
        if self.buf is not None and self.buf.shape[-2] >= self.length:
            return
        cap = self.length + max(self.length // 2, 128)  # geometric growth: amortised O(1) per token
        buf = like.new_empty(*like.shape[:-2], cap, like.shape[-1])
        if self.buf is not None:
            old = self.buf.shape[-2]
            buf[..., :old, :] = self.buf
        self.buf = buf

    def append(self, x: torch.Tensor) -> torch.Tensor:
        """Add ``x [B, H, t, D]`` and return the dequantized history ``[B, H, length, D]``."""
        t = x.shape[-2]
        prev_len = self.length
        self.length += t
        self.head_dim = x.shape[-1]
        if self.fp is None or self.fp.shape[-2] == 0:
            fp = x
        else:
            fp = torch.cat([self.fp, x], dim=-2)
        if self.bits >= OFF_BITS:
            self.fp = fp
            return fp
        start, target = self.n_quant, self._target()
        k = target - start
        deq = None
        if k > 0:
            everything = k == fp.shape[-2]
            chunk, deq = self._quantize(fp if everything else fp[..., :k, :])
            self._store(self._pack(chunk.codes), chunk.scale, chunk.zero)
            # compact copy of the remaining window: a slice would pin the old, larger storage
            if everything:
                if self._empty is None:
                    self._empty = x.new_empty(*x.shape[:-2], 0, x.shape[-1])
                fp = self._empty
            else:
                fp = fp[..., k:, :].clone(memory_format=torch.contiguous_format)
            self.n_quant = target
        self.fp = fp
        if self.keep_dequantized:
            self._ensure_capacity(x)
            lo = max(prev_len, target)  # new tokens not overwritten by their dequantized values below
            if lo < self.length:
                self.buf[..., lo : self.length, :] = x[..., lo - prev_len :, :]
            if deq is not None:
                self.buf[..., start:target, :] = deq
            return self.buf[..., : self.length, :]
        if self.n_quant == 0:
            return fp
        return torch.cat([self.dequantize_stored(x.dtype), fp], dim=-2)

    def stored_tensors(self) -> list[torch.Tensor]:
        out = [t for entry in (*self.closed, *self.open) for t in entry]
        return out + ([self.fp] if self.fp is not None else [])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stored_tensors())

    def workspace_nbytes(self) -> int:
        return 0 if self.buf is None else self.buf.numel() * self.buf.element_size()

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.closed = [[fn(t) for t in entry] for entry in self.closed]
        self.open = [[fn(t) for t in entry] for entry in self.open]
        self._empty = None
        for name in ("fp", "buf"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))


class QuantizedKVLayer(CacheLayerMixin):
    """One decoder layer's packed, quantized K/V (see the module docstring for the token rule)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(
        self, key_bits: int, value_bits: int, config: KVQuantConfig, keep_dequantized: bool = False
    ) -> None:
        super().__init__()
        self.key_bits, self.value_bits = key_bits, value_bits
        self.key_stream = _PackedStream(key_bits, config.per_channel_keys, config, keep_dequantized)
        self.value_stream = _PackedStream(value_bits, False, config, keep_dequantized)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(K{self.key_bits}/V{self.value_bits})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.key_stream.append(key_states), self.value_stream.append(value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.key_stream.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.key_stream.reset()
        self.value_stream.reset()
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("QuantizedKVLayer cannot be cropped (quantized groups are not reversible)")

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.key_stream.map_tensors(fn)
        self.value_stream.map_tensors(fn)

    def offload(self) -> None:
        if self.is_initialized:
            self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def stored_tensors(self) -> list[torch.Tensor]:
        return self.key_stream.stored_tensors() + self.value_stream.stored_tensors()

    def nbytes(self) -> int:
        return self.key_stream.nbytes() + self.value_stream.nbytes()

    def workspace_nbytes(self) -> int:
        return self.key_stream.workspace_nbytes() + self.value_stream.workspace_nbytes()


class PackedQuantizedCache(Cache):
    """A ``transformers`` Cache storing bit-packed KV per ``KVQuantConfig``; pass it as ``past_key_values``
    to ``model(...)`` or ``model.generate(...)``.  16/16-bit layers are plain ``DynamicLayer``s."""

    def __init__(self, config: KVQuantConfig, keep_dequantized: bool = False) -> None:
        layers: list[CacheLayerMixin] = []
        for kb, vb in zip(config.key_bits, config.value_bits, strict=True):
            if kb >= OFF_BITS and vb >= OFF_BITS:
                layers.append(DynamicLayer())
            else:
                layers.append(QuantizedKVLayer(kb, vb, config, keep_dequantized))
        super().__init__(layers=layers)
        self.kv_config = config

    @classmethod
    def for_model(cls, model: nn.Module, config: KVQuantConfig, keep_dequantized: bool = False) -> PackedQuantizedCache:
        num_layers, _, head_dim = kv_dims(model)
        config.validate(num_layers, head_dim)
        return cls(config, keep_dequantized=keep_dequantized)

    def stored_tensors(self) -> list[torch.Tensor]:
        """Every tensor that makes up the stored cache (codes, scales, zeros, full-precision windows)."""
        out: list[torch.Tensor] = []
        for layer in self.layers:
            if isinstance(layer, QuantizedKVLayer):
                out += layer.stored_tensors()
            elif layer.is_initialized:
                out += [t for t in (layer.keys, layer.values) if t is not None]
        return out

    def nbytes(self) -> int:
        """Stored bytes: packed codes + fp16 scales + fp16 zeros + full-precision window (no workspace)."""
        return sum(t.numel() * t.element_size() for t in self.stored_tensors())

    def storage_nbytes(self) -> int:
        """Cross-check of :meth:`nbytes`: bytes of the distinct storages behind the held tensors (differs if
        any held tensor is a view pinning a larger buffer)."""
        seen: dict[int, int] = {}
        for t in self.stored_tensors():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())

    def workspace_nbytes(self) -> int:
        """Bytes of the dequantized working copies (``keep_dequantized=True``), not counted in ``nbytes``."""
        return sum(l.workspace_nbytes() for l in self.layers if isinstance(l, QuantizedKVLayer))

    def bytes_per_token(self) -> float:
        n = self.get_seq_length()
        return self.nbytes() / n if n else 0.0


# --------------------------------------------------------------------------------------------------------------
# Analytic memory
# --------------------------------------------------------------------------------------------------------------
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


__all__ = [
    "QUANT_BITS",
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
    "QuantizedKVLayer",
    "PackedQuantizedCache",
    "kv_bytes_per_token",
    "fp16_kv_bytes_per_token",
    "kv_memory_report",
]
