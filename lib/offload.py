"""The one "move a decoder layer to the compute device, work, move it back" pattern of offloaded runs."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (or buffer); CPU for a module that holds neither."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def on_device(layer: nn.Module, device: torch.device | str, offload: bool = True) -> Iterator[nn.Module]:
    """With ``offload``, ``layer`` lives on ``device`` inside the block and goes back to the device it was
    parked on afterwards (also when the block raises, so a failed step never strands a layer on the GPU);
    without, the block runs on the layer where it is."""
    if not offload:
        yield layer
        return
    park = module_device(layer)
    layer.to(device)
    try:
        yield layer
    finally:
        layer.to(park)
