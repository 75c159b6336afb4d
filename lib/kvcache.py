"""The real packed KV cache for ``generate``: bit-packed codes + float16 scales/zeros + a full-precision
residual window, as a transformers ``Cache``."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from .bitpack import pack_bits, unpack_bits
from .kvconfig import OFF_BITS, KVQuantConfig, kv_dims, num_quantized_tokens
from .kvquantizer import QuantizedChunk, _dequantize_along, _quantize_rows

# quantized rows (tokens, or key groups) merged into one stored segment; decode steps append without copying
_SEGMENT_ROWS = 64


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
