"""Model loading and the few structural lookups the rest of the tool needs.

Dispatch is by the checkpoint's config (``model_type`` / ``architectures``), never by the model's name:
LLaMA-style causal LMs load through ``AutoModelForCausalLM``, LLaVA-1.5 and LLaVA-NeXT (1.6) through
transformers' own Llava classes. Only the language model's decoder layers are ever pruned.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Wanda uses max_position_embeddings as the calibration/eval window; Mistral-style configs say 32k, which
# does not fit in memory for 128 samples. Cap the default and say so.
DEFAULT_SEQLEN_CAP = 4096

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# The original LLaVA release (liuhaotian/*) uses its own architecture class, which only the llava package knows.
ORIGINAL_LLAVA_ARCHS = {"LlavaLlamaForCausalLM", "LlavaMistralForCausalLM", "LlavaMptForCausalLM"}


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded; the message is one line meant for the user."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    name: str
    multimodal: bool


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` is float16 on an accelerator (as Wanda) and float32 on CPU, where half matmuls are slow."""
    if dtype == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[dtype]


def _load_config(name: str, cache_dir: str | None):
    from transformers import AutoConfig

    if not os.path.isdir(name) and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise ModelLoadError(f"cannot load model '{name}': no such directory (and not a hub id)")
    try:
        return AutoConfig.from_pretrained(name, cache_dir=cache_dir)
    except Exception as exc:  # transformers raises OSError/ValueError/HF errors; all mean "cannot load"
        hint = "" if os.path.isdir(name) else " (no local directory of that name; offline nodes need a local path)"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model config for '{name}'{hint}: {first}") from exc


def load_tokenizer(name: str, cache_dir: str | None = None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, cache_dir=cache_dir)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load tokenizer for '{name}': {first}") from exc


def load_processor(name: str, cache_dir: str | None = None):
    """A multimodal checkpoint's processor (tokenizer + image processor), or None when it ships none."""
    from transformers import AutoProcessor

    try:
        proc = AutoProcessor.from_pretrained(name, cache_dir=cache_dir)
    except Exception:  # text-only folders and checkpoints without a processor config
        return None
    return proc if hasattr(proc, "image_processor") else None


def model_class_for(config) -> tuple[type, bool]:
    """The transformers class for a config, and whether the model is multimodal."""
    import transformers

    archs = set(getattr(config, "architectures", None) or [])
    if archs & ORIGINAL_LLAVA_ARCHS:
        try:
            from llava.model import LlavaLlamaForCausalLM  # type: ignore  # noqa: F401
        except ImportError as exc:
            raise ModelLoadError(
                "this is an original LLaVA checkpoint (liuhaotian/*): install the LLaVA package "
                "(pip install git+https://github.com/haotian-liu/LLaVA) or use the llava-hf/* conversion, "
                "e.g. llava-hf/llava-1.5-7b-hf"
            ) from exc
        import llava.model as llava_model  # type: ignore

        arch = sorted(archs & ORIGINAL_LLAVA_ARCHS)[0]
        return getattr(llava_model, arch), True
    if config.model_type == "llava":
        return transformers.LlavaForConditionalGeneration, True
    if config.model_type == "llava_next":
        return transformers.LlavaNextForConditionalGeneration, True
    return transformers.AutoModelForCausalLM, False


def load_model(name: str, *, cache_dir: str | None = None, dtype: str = "auto", device: str = "cpu") -> LoadedModel:
    """Load a causal LM or LLaVA model onto the CPU in ``dtype`` (the caller moves what it needs).

    Keeping the weights on the CPU and moving one decoder layer at a time is what lets a 13B model prune on a
    24 GB GPU; :func:`place_model` moves the whole model when it fits.
    """
    config = _load_config(name, cache_dir)
    cls, multimodal = model_class_for(config)
    torch_dtype = resolve_dtype(dtype, device)
    tokenizer = load_tokenizer(name, cache_dir)
    try:
        model = cls.from_pretrained(name, cache_dir=cache_dir, dtype=torch_dtype, low_cpu_mem_usage=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model weights for '{name}': {first}") from exc
    model.eval()
    # Wanda disables the cache for calibration and evaluation; generation passes its own cache.
    model.config.use_cache = False
    text_cfg = text_config(model)
    text_cfg.use_cache = False
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, multimodal=multimodal)


def text_config(model: nn.Module):
    """The language model's config (``text_config`` for LLaVA, the config itself otherwise)."""
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


def decoder(model: nn.Module) -> nn.Module:
    """The language model's decoder (the module that holds ``layers``); the vision tower is never returned."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is None or not hasattr(dec, "layers"):
        raise ModelLoadError(f"{type(model).__name__}: cannot find the language model's decoder layers")
    return dec


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return decoder(model).layers


def default_seqlen(model: nn.Module, requested: int | None, cap: int = DEFAULT_SEQLEN_CAP) -> int:
    """Wanda's window is ``max_position_embeddings``; cap it at ``cap`` unless the user asked for more."""
    max_pos = int(getattr(text_config(model), "max_position_embeddings", cap))
    if requested is not None:
        if requested > max_pos:
            logger.warning("--seqlen %d exceeds max_position_embeddings %d", requested, max_pos)
        return requested
    if max_pos > cap:
        logger.info("seqlen capped at %d (max_position_embeddings is %d; pass --seqlen to change)", cap, max_pos)
        return cap
    return max_pos


def find_linears(module: nn.Module) -> dict[str, nn.Linear]:
    """All ``nn.Linear`` submodules by their name relative to ``module`` (``self_attn.q_proj`` etc.)."""
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def layer_prefix(model: nn.Module) -> str:
    """The state-dict prefix of the decoder layers (``model.layers.`` or ``model.language_model.layers.``)."""
    layers = decoder_layers(model)
    for name, mod in model.named_modules():
        if mod is layers:
            return name + "."
    raise ModelLoadError("decoder layers are not a submodule of the model")


def pruned_weight_names(model: nn.Module) -> list[str]:
    """Fully qualified names of every weight the tool may prune, in layer order."""
    prefix = layer_prefix(model)
    names = []
    for i, layer in enumerate(decoder_layers(model)):
        for name in find_linears(layer):
            names.append(f"{prefix}{i}.{name}.weight")
    return names


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def should_offload(model: nn.Module, device: str, mode: str = "auto") -> bool:
    """Whether weights stay on the CPU with one decoder layer on ``device`` at a time."""
    dev = torch.device(device)
    if dev.type == "cpu" or mode == "off":
        return False
    if mode == "on":
        return True
    free, _total = torch.cuda.mem_get_info(dev)
    # Leave room for activations: offload when the weights would take more than 70% of free memory.
    return param_bytes(model) > 0.7 * free


def place_model(model: nn.Module, device: str, offload: bool) -> None:
    """Put the whole model on ``device``, or only the small non-layer parts when offloading."""
    if not offload:
        model.to(device)
        return
    layers = decoder_layers(model)
    prefix = layer_prefix(model)
    # Everything except the decoder layers goes to the device (embeddings, norm, lm_head, vision tower).
    layer_params = {id(p) for p in layers.parameters()}
    for p in model.parameters():
        if id(p) not in layer_params:
            p.data = p.data.to(device)
    for b_name, buf in model.named_buffers():
        if not b_name.startswith(prefix):
            mod_name, _, attr = b_name.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            mod._buffers[attr] = buf.to(device)
