"""The one capture path: inputs of the first decoder layer, with every keyword argument the model passes.

Wanda and SparseGPT hard-code which arguments a decoder layer gets (attention_mask, position_ids) and break
whenever transformers changes them (5.x passes ``position_embeddings``, caches, ...). Here the first layer is
swapped for a catcher that records its hidden states and *all* its other arguments, and the model's forward
stops there; every later layer is called with the same arguments. Pruning, layer-wise evaluation and the
search all use this module.
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
        self.store.hidden.append(hidden_states.detach().to(self.store_device))
        if self.store.kwargs is None:
            self.store.args = args
            self.store.kwargs = kwargs
        raise _StopForward


@dataclass
class LayerInputs:
    """Hidden states entering a decoder layer (one tensor per batch) and the arguments every layer gets."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: tuple = ()
    kwargs: dict[str, Any] | None = None

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


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str,
    store_device: torch.device | str | None = None,
) -> LayerInputs:
    """Run ``model`` on each ``[b, seqlen]`` batch of token ids up to decoder layer 0 and record its inputs.

    All batches must have the same shape (calibration windows and eval chunks do), so the keyword arguments
    of the first call serve every batch. ``store_device`` (default: ``device``) holds the hidden states.
    """
    device = torch.device(device)
    store_device = torch.device(store_device) if store_device is not None else device
    layers = decoder_layers(model)
    store = LayerInputs()
    first = layers[0]
    layers[0] = _Catcher(first, store, store_device)
    try:
        shape = None
        for ids in batches:
            if shape is not None and ids.shape != shape:
                raise ValueError(f"all batches must have one shape, got {tuple(ids.shape)} after {tuple(shape)}")
            shape = ids.shape
            try:
                model(input_ids=ids.to(device), use_cache=False)
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
    args = to_device(inputs.args, device)
    kwargs = to_device(inputs.kwargs or {}, device)
    outs = []
    for h in inputs.hidden:
        out = layer(h.to(device), *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out  # transformers < 4.54 returned a tuple
        if keep:
            outs.append(out.to(h.device))
    return outs
