"""Simulated KV quantization: forward pre-hooks on every decoder layer's ``self_attn`` hand attention
quantize-dequantized K/V (works with ``use_cache=False``, LLaVA and layer-by-layer runners)."""
from __future__ import annotations

import functools
import inspect
import logging
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .kvcache import PackedQuantizedCache
from .kvconfig import OFF_BITS, KVQuantConfig, kv_dims
from .kvquantizer import fake_quantize_kv
from .models import decoder_layers

logger = logging.getLogger(__name__)


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


@functools.cache
def _cache_kwarg_of(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_kwarg(attention: nn.Module) -> str:
    """The keyword an attention module's forward takes its cache by: ``cache`` from transformers 5.24 (which
    still maps the old name onto it, but drops it when the layer passes ``cache=None`` as well), else
    ``past_key_values``."""
    return _cache_kwarg_of(type(attention))


def _make_sim_hook(layer_idx: int, key_bits: int, value_bits: int, config: KVQuantConfig, warned: set) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        name = cache_kwarg(module)
        cache = kwargs.get(name)
        if cache is None and name != "past_key_values":
            cache = kwargs.pop("past_key_values", None)
        if cache is None:
            kwargs[name] = _FakeQuantCache(key_bits, value_bits, config)
        elif isinstance(cache, PackedQuantizedCache):
            pass  # already quantizes for real
        elif _wraps_plain_dynamic(cache, layer_idx):
            kwargs[name] = _FakeQuantCache(key_bits, value_bits, config, inner=cache)
        elif type(cache) not in warned:
            warned.add(type(cache))
            logger.warning("simulate_kv_quant: %s passed to attention; KV left unquantized", type(cache).__name__)
        return args, kwargs

    return hook


_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, KVQuantConfig]" = weakref.WeakKeyDictionary()


def active_kv_simulation(model: nn.Module) -> KVQuantConfig | None:
    """The KV quantization being simulated on ``model`` right now (inside :func:`simulate_kv_quant`), or None;
    evaluations record it so every number says which KV setting it was measured under."""
    return _ACTIVE.get(model)


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
        _ACTIVE[model] = config
        yield config
    finally:
        _ACTIVE.pop(model, None)
        for h in handles:
            h.remove()
