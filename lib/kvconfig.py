"""KV quantization settings: bit-widths per decoder layer, grouping scheme, residual window, and the
token rule shared by the simulation and the packed cache (see :mod:`lib.kvquant` for the whole design)."""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass

from torch import nn

from .models import decoder_layers, text_config

QUANT_BITS = (2, 3, 4, 5, 6, 8)
OFF_BITS = 16
SUPPORTED_BITS = (*QUANT_BITS, OFF_BITS)
SCHEMES = ("kivi", "per_token")


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


def kv_dims(model: nn.Module) -> tuple[int, int, int]:
    """(num decoder layers, num KV heads, head_dim): the layers the hooks and caches see, heads from the text config."""
    cfg = text_config(model)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return len(decoder_layers(model)), kv_heads, head_dim
