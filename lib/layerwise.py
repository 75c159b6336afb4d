"""The one capture path: inputs of the first decoder layer, with every keyword argument the model passes.

Wanda and SparseGPT hard-code which arguments a decoder layer gets (attention_mask, position_ids) and break
whenever transformers changes them (5.x passes ``position_embeddings``, caches, ...). Here the first layer is
swapped for a catcher that records its hidden states and *all* its other arguments, and the model's forward
stops there; every later layer is called with the same arguments. Pruning, layer-wise evaluation and the
search all use this module.

The arguments are recorded per batch, because they depend on the batch's shape (``position_embeddings``,
attention masks): a short last evaluation batch, or calibration windows of different lengths, each get their
own. Batches whose arguments are equal share one stored copy, so equal-shaped batches cost one set.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from .models import decoder_layers


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for decoder layer 0; looks like it (attribute reads pass through) so model code that
    inspects the layer (e.g. ``attention_type`` for sliding-window models) still works."""

    def __init__(self, layer: nn.Module, store: "LayerInputs", store_device: torch.device):
        super().__init__()
        self.layer = layer
        self.store = store
        self.store_device = store_device

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, hidden_states, *args, **kwargs):
        self.store.add(hidden_states.detach().to(self.store_device), args, kwargs)
        raise _StopForward


def _same(a: Any, b: Any) -> bool:
    """Structural equality of captured arguments (tensors by value, on the same device and dtype)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (type(a) is type(b) and isinstance(a, (int, float, str, bool)) and a == b)


@dataclass
class LayerInputs:
    """Hidden states entering a decoder layer (one tensor per batch) and, per batch, the other arguments the
    model passed to its layers (``batch_args[i]``, ``batch_kwargs[i]`` go with ``hidden[i]``; equal ones are
    one shared object)."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    batch_args: list[tuple] = field(default_factory=list)
    batch_kwargs: list[dict[str, Any]] = field(default_factory=list)

    def add(self, hidden: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> None:
        for i, known in enumerate(self.batch_kwargs):
            if known is not None and _same(known, kwargs) and _same(self.batch_args[i], args):
                args, kwargs = self.batch_args[i], known
                break
        self.hidden.append(hidden)
        self.batch_args.append(args)
        self.batch_kwargs.append(kwargs)

    @property
    def kwargs(self) -> dict[str, Any] | None:
        """The first batch's keyword arguments (what every batch gets when all have one shape)."""
        return self.batch_kwargs[0] if self.batch_kwargs else None

    @property
    def args(self) -> tuple:
        return self.batch_args[0] if self.batch_args else ()

    @property
    def num_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move the tensors inside nested tuples/lists/dicts (e.g. ``position_embeddings``)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def batch_inputs(ids: torch.Tensor, device: torch.device | str) -> dict[str, Any]:
    """The model's keyword arguments for one batch: ``input_ids``, plus the pixel inputs an image-text window
    carries in ``ids.mm_inputs`` (lib/mmdata.py), so image windows run the full multimodal forward."""
    extra = getattr(ids, "mm_inputs", None) or {}
    return {"input_ids": ids.to(device), **{k: to_device(v, device) for k, v in extra.items()}}


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str,
    store_device: torch.device | str | None = None,
) -> LayerInputs:
    """Run ``model`` on each ``[b, seqlen]`` batch of token ids up to decoder layer 0 and record its inputs.

    Batches may differ in shape (a short last batch, windows of different lengths): each batch keeps the
    arguments of its own call. ``store_device`` (default: ``device``) holds the hidden states.
    """
    device = torch.device(device)
    store_device = torch.device(store_device) if store_device is not None else device
    layers = decoder_layers(model)
    store = LayerInputs()
    first = layers[0]
    layers[0] = _Catcher(first, store, store_device)
    try:
        for ids in batches:
            try:
                model(**batch_inputs(ids, device), use_cache=False)
            except _StopForward:
                pass
    finally:
        layers[0] = first
    return store


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs, device: torch.device | str,
              keep: bool = True) -> list[torch.Tensor]:
    """Outputs of ``layer`` for every stored batch, on the device the inputs are stored on.
    ``keep=False`` runs the layer for its hooks only and keeps no outputs (saves one activation buffer)."""
    if len(inputs.batch_kwargs) != len(inputs.hidden):
        raise ValueError(f"{len(inputs.hidden)} hidden batches but {len(inputs.batch_kwargs)} argument sets")
    moved: dict[int, tuple[tuple, dict]] = {}  # shared argument sets move to the device once
    outs = []
    for h, args, kwargs in zip(inputs.hidden, inputs.batch_args, inputs.batch_kwargs):
        key = id(kwargs)
        if key not in moved:
            moved[key] = (to_device(args, device), to_device(kwargs or {}, device))
        dev_args, dev_kwargs = moved[key]
        out = layer(h.to(device), *dev_args, **dev_kwargs)
        out = out[0] if isinstance(out, tuple) else out  # transformers < 4.54 returned a tuple
        if keep:
            outs.append(out.to(h.device))
    return outs
