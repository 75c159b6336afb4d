"""Pruning masks on disk: one safetensors file of bit-packed masks plus a JSON manifest.

Each mask is stored as ``numpy.packbits`` of the row-major boolean mask (1 = pruned, big-endian bit order),
one uint8 tensor per pruned weight, so a mask costs one bit per weight (LLaMA-2-7B's decoder linears:
6.5e9 weights, 0.81 GB). The manifest records the model, method, sparsity type, shape and density of every
mask and the file's sha256, so ``--masks`` can refuse a file that does not belong to the model.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from .io import atomic_path, write_json

MASKS_FILE = "masks.safetensors"
MANIFEST_FILE = "masks.json"
FORMAT = "optspa-masks"
VERSION = 1


class MaskError(ValueError):
    """Masks that cannot be read or do not fit the model; one line for the user."""


def pack(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.detach().to("cpu", torch.bool).numpy().reshape(-1)))


def unpack(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = int(np.prod(shape))
    bits = np.unpackbits(packed.numpy(), count=n)
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_masks(folder: str, packed: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
               meta: dict[str, Any]) -> str:
    """Write ``masks.safetensors`` and ``masks.json`` into ``folder``; returns the manifest path."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, MASKS_FILE)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in packed.items()}, tmp)
        digest = _sha256(tmp)
    modules = {}
    for name, shape in shapes.items():
        numel = int(np.prod(shape))
        pruned = int(np.unpackbits(packed[name].numpy(), count=numel).sum())
        modules[name] = {"shape": list(shape), "density": round(1 - pruned / numel, 6)}
    manifest = {
        "format": FORMAT, "version": VERSION, "file": MASKS_FILE, "sha256": digest,
        "bits": "numpy.packbits, row-major, big-endian bit order, 1 = pruned",
        **meta, "modules": modules,
    }
    manifest_path = os.path.join(folder, MANIFEST_FILE)
    write_json(manifest_path, manifest)
    return manifest_path


def load_masks(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read masks from a folder (or its manifest or safetensors file): ``{weight name: bool mask}``."""
    import json

    from safetensors.torch import load_file

    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    manifest_path = os.path.join(folder, MANIFEST_FILE)
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise MaskError(f"cannot read mask manifest {manifest_path}: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise MaskError(f"{manifest_path} is not an optspa mask manifest")
    data_path = os.path.join(folder, manifest.get("file", MASKS_FILE))
    try:
        if _sha256(data_path) != manifest.get("sha256"):
            raise MaskError(f"{data_path} does not match the checksum in {manifest_path}")
        packed = load_file(data_path)
    except OSError as exc:
        raise MaskError(f"cannot read masks {data_path}: {exc.strerror or exc}") from exc
    masks = {}
    for name, info in manifest["modules"].items():
        if name not in packed:
            raise MaskError(f"{data_path} lacks the mask for {name}")
        masks[name] = unpack(packed[name], tuple(info["shape"]))
    return masks, manifest


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor], allowed: list[str]) -> None:
    """Zero the masked weights; every name must be a prunable weight of ``model`` with the mask's shape.
    Checks everything before touching any weight, so a mismatch leaves the model as it was."""
    params = dict(model.named_parameters())
    allowed_set = set(allowed)
    for name, mask in masks.items():
        if name not in allowed_set or name not in params:
            raise MaskError(f"mask for '{name}' matches no prunable weight of this model")
        if tuple(params[name].shape) != tuple(mask.shape):
            raise MaskError(f"mask for '{name}' has shape {tuple(mask.shape)}, the weight {tuple(params[name].shape)}")
    with torch.no_grad():
        for name, mask in masks.items():
            p = params[name]
            p.masked_fill_(mask.to(p.device), 0)
