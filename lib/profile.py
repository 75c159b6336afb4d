"""Layer-wise compression profiles: sparsity per decoder layer (optionally per module) and KV bits per layer.

One versioned JSON format serves pruning, search and reload:

    {
      "format": "optspa-profile", "version": 1,
      "num_layers": 32,
      "sparsity": [0.475, 0.5, ...],                     # per decoder layer, or null
      "module_sparsity": {"3": {"self_attn.q_proj": 0.45}},  # optional overrides per layer and module
      "kv_bits": {"key": [8, 6, ...], "value": [8, 6, ...]},  # or null (16 = not quantized)
      "target_sparsity": 0.5, "sparsity_type": "unstructured",
      "model": "...", "method": "...", "meta": {...}       # free-form: objective values, study name, ...
    }

The original Optspa tool's files also load: block keys ``{"0": 0.475, "1": 0.5, ...}`` (contiguous blocks
of layers, ``num_blocks`` of them, remainder to the first blocks) and fine keys
``{"0-self_attn.q_proj": 0.5, ...}`` (layer-module), as JSON or, for fine profiles, as the Python dict
literal the original tool wrote (``{'0-self_attn.q_proj': 0.47500000000000003}``, read with
``ast.literal_eval``, never ``eval``).
"""
from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from typing import Any

FORMAT = "optspa-profile"
VERSION = 1


class ProfileError(ValueError):
    """A profile that cannot be read or does not fit the model; one line for the user."""


def block_layers(num_layers: int, num_blocks: int) -> list[list[int]]:
    """Contiguous blocks of layers; the first ``num_layers % num_blocks`` blocks get one extra layer."""
    if not 1 <= num_blocks <= num_layers:
        raise ProfileError(f"--num_blocks {num_blocks} must be between 1 and the number of layers ({num_layers})")
    base, extra = divmod(num_layers, num_blocks)
    blocks, start = [], 0
    for b in range(num_blocks):
        size = base + (1 if b < extra else 0)
        blocks.append(list(range(start, start + size)))
        start += size
    return blocks


@dataclass
class Profile:
    num_layers: int
    sparsity: list[float] | None = None
    module_sparsity: dict[int, dict[str, float]] = field(default_factory=dict)
    key_bits: list[int] | None = None
    value_bits: list[int] | None = None
    target_sparsity: float | None = None
    sparsity_type: str = "unstructured"
    model: str | None = None
    method: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # head-wise KV budgets (lib/kvbudget.py KVBudgetConfig.to_dict(): budget, window, per-KV-head capacities
    # [layer][kv head], selection rule), beside the per-layer KV bits; optional
    kv_budget: dict[str, Any] | None = None

    @classmethod
    def uniform(cls, num_layers: int, ratio: float, **kw) -> "Profile":
        return cls(num_layers=num_layers, sparsity=[ratio] * num_layers, target_sparsity=ratio, **kw)

    def ratio(self, layer: int, module: str) -> float:
        """Sparsity of ``module`` (e.g. ``self_attn.q_proj``) in decoder layer ``layer``."""
        override = self.module_sparsity.get(layer, {})
        if module in override:
            return override[module]
        if self.sparsity is None:
            raise ProfileError("the profile has no sparsity ratios")
        return self.sparsity[layer]

    def is_uniform(self) -> bool:
        return self.sparsity is not None and len(set(self.sparsity)) <= 1 and not self.module_sparsity

    def validate(self, num_layers: int, module_names: list[str] | None = None) -> None:
        """Raise :class:`ProfileError` if the profile does not fit a model with ``num_layers`` layers."""
        if self.num_layers != num_layers:
            raise ProfileError(f"profile is for {self.num_layers} decoder layers, the model has {num_layers}")
        for name, values in (("sparsity", self.sparsity), ("kv key bits", self.key_bits),
                             ("kv value bits", self.value_bits)):
            if values is not None and len(values) != num_layers:
                raise ProfileError(f"profile has {len(values)} {name} entries for {num_layers} layers")
        ratios = list(self.sparsity or []) + [r for mods in self.module_sparsity.values() for r in mods.values()]
        for r in ratios:
            if not 0 <= r < 1:
                raise ProfileError(f"profile sparsity {r} is outside [0, 1)")
        for layer, mods in self.module_sparsity.items():
            if not 0 <= layer < num_layers:
                raise ProfileError(f"profile names layer {layer}; the model has {num_layers}")
            if module_names is not None:
                unknown = sorted(set(mods) - set(module_names))
                if unknown:
                    raise ProfileError(f"profile names unknown module(s) {', '.join(unknown)} in layer {layer}")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        kv = None if self.key_bits is None else {"key": self.key_bits, "value": self.value_bits}
        return {
            "format": FORMAT, "version": VERSION, "num_layers": self.num_layers,
            "sparsity": self.sparsity,
            "module_sparsity": {str(k): v for k, v in sorted(self.module_sparsity.items())},
            "kv_bits": kv, "target_sparsity": self.target_sparsity, "sparsity_type": self.sparsity_type,
            "model": self.model, "method": self.method, "meta": self.meta,
            **({"kv_budget": self.kv_budget} if self.kv_budget is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], num_layers: int | None = None, num_blocks: int | None = None) -> "Profile":
        if data.get("format") == FORMAT:
            if data.get("version") != VERSION:
                raise ProfileError(f"profile version {data.get('version')} is not supported (expected {VERSION})")
            kv = data.get("kv_bits") or {}
            return cls(
                num_layers=int(data["num_layers"]), sparsity=data.get("sparsity"),
                module_sparsity={int(k): dict(v) for k, v in (data.get("module_sparsity") or {}).items()},
                key_bits=kv.get("key"), value_bits=kv.get("value"),
                target_sparsity=data.get("target_sparsity"), sparsity_type=data.get("sparsity_type", "unstructured"),
                model=data.get("model"), method=data.get("method"), meta=data.get("meta") or {},
                kv_budget=data.get("kv_budget"),
            )
        return cls._from_original(data, num_layers, num_blocks)

    @classmethod
    def _from_original(cls, data: dict[str, Any], num_layers: int | None, num_blocks: int | None) -> "Profile":
        """The original tool's flat files: block keys or layer-module keys."""
        if num_layers is None:
            raise ProfileError("reading an original-format profile needs the model's layer count")
        if not data or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data.values()):
            raise ProfileError("profile is neither an optspa-profile nor an original {key: ratio} file")
        if all("-" in k for k in data):
            module_sparsity: dict[int, dict[str, float]] = {}
            for key, ratio in data.items():
                layer, module = key.split("-", 1)
                if not layer.isdigit():
                    raise ProfileError(f"profile key '{key}' is not LAYER-MODULE")
                module_sparsity.setdefault(int(layer), {})[module] = float(ratio)
            missing = sorted(set(range(num_layers)) - set(module_sparsity))
            if missing:
                raise ProfileError(f"profile has no entries for layer(s) {missing[:5]} of {num_layers}")
            return cls(num_layers=num_layers, module_sparsity=module_sparsity, meta={"source_format": "original-fine"})
        if not all(k.isdigit() for k in data):
            raise ProfileError("profile keys must all be block numbers or all LAYER-MODULE")
        blocks = num_blocks if num_blocks is not None else len(data)
        if len(data) != blocks:
            raise ProfileError(f"profile has {len(data)} blocks, --num_blocks says {blocks}")
        layout = block_layers(num_layers, blocks)
        sparsity = [0.0] * num_layers
        for b, layers in enumerate(layout):
            if str(b) not in data:
                raise ProfileError(f"profile has no entry for block {b}")
            for layer in layers:
                sparsity[layer] = float(data[str(b)])
        return cls(num_layers=num_layers, sparsity=sparsity, meta={"source_format": "original-blocks"})


def profile_filename(method: str, sparsity_type: str, target: float | None, kv_avg: float | None = None) -> str:
    """``profile_optspa_unstructured_s0.50.json``; the target is in the name so sweeps never overwrite."""
    name = f"profile_{method}_{sparsity_type.replace(':', '-')}"
    if target is not None:
        name += f"_s{target:.2f}"
    if kv_avg is not None:
        name += f"_kv{kv_avg:g}"
    return name + ".json"


def _parse_text(path: str, text: str) -> Any:
    """JSON, or the Python dict literal the original tool wrote for fine profiles (single quotes, float reprs
    such as ``0.47500000000000003``), read by a literal parser: nothing in the file is ever executed."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        json_error = exc
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ProfileError(f"profile {path} is not valid JSON (nor a Python dict literal): {json_error.msg} at "
                           f"line {json_error.lineno}") from None


def load_profile(path: str, num_layers: int | None = None, num_blocks: int | None = None) -> Profile:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ProfileError(f"profile {path} is not a text file ({exc.reason})") from exc
    data = _parse_text(path, text)
    if not isinstance(data, dict):
        raise ProfileError(f"profile {path} is not a JSON object (or dict literal)")
    if data.get("format") != FORMAT:
        # Original files: keys are block numbers or LAYER-MODULE strings; a literal may spell block numbers as ints.
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in data):
            raise ProfileError(f"profile {path} has keys that are neither block numbers nor LAYER-MODULE")
        data = {str(k): v for k, v in data.items()}
    try:
        return Profile.from_dict(data, num_layers, num_blocks)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, ProfileError):
            raise
        raise ProfileError(f"profile {path} is malformed: {exc}") from exc
