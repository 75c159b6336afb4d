"""Model loading and the few structural lookups the rest of the tool needs.

Dispatch is by the checkpoint's config (``model_type`` / ``architectures``), never by the model's name:
LLaMA-style causal LMs load through ``AutoModelForCausalLM``, LLaVA-1.5 and LLaVA-NeXT (1.6) through
transformers' own Llava classes. Only the language model's decoder layers are ever pruned.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
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
    # An original LLaVA checkpoint (liuhaotian/*): its layout (lib/llava_original.py); ``model`` is then its
    # language model only, and ``multimodal`` is False until lib.llava_original.build_multimodal wraps it.
    original_llava: Any = None
    # What --save_model writes back: the checkpoint's dtype (or the one asked for) and its runtime settings.
    save_dtype: torch.dtype | None = None
    runtime_overrides: list[tuple[Any, Any]] = field(default_factory=list)


def checkpoint_dtype(config: Any) -> torch.dtype:
    """The dtype a checkpoint is stored in (``dtype`` / ``torch_dtype`` of its config, or of its text config
    for LLaVA; a raw config dict works too); float32 when it does not say."""
    cfgs = [config, config.get("text_config") if isinstance(config, dict) else getattr(config, "text_config", None)]
    for cfg in cfgs:
        if cfg is None:
            continue
        for key in ("dtype", "torch_dtype"):
            value = cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)
            if isinstance(value, torch.dtype):
                return value
            if isinstance(value, str) and value.replace("torch.", "") in DTYPES:
                return DTYPES[value.replace("torch.", "")]
    return torch.float32


def resolve_dtype(dtype: str, device: str, stored: torch.dtype = torch.float32) -> torch.dtype:
    """The compute dtype. ``auto`` is the checkpoint's own dtype ``stored`` (a bf16 LLaMA-3 stays bf16 on a GPU),
    except that the CPU computes half-precision checkpoints in float32, where half matmuls are slow or missing;
    :func:`save_pretrained_as_loaded` writes them back in ``stored``."""
    if dtype == "auto":
        if torch.device(device).type == "cpu" and stored in (torch.float16, torch.bfloat16):
            return torch.float32
        return stored
    return DTYPES[dtype]


def _disable_cache(model: nn.Module) -> list[tuple[Any, Any]]:
    """Turn the KV cache off in the config(s) (Wanda's calibration and evaluation run without one; generation
    passes its own cache); returns the original settings so a saved checkpoint gets them back."""
    saved = []
    configs = [model.config] + ([text_config(model)] if text_config(model) is not model.config else [])
    for cfg in configs:  # LLaVA: the outer and the text config
        saved.append((cfg, cfg.__dict__.get("use_cache", _ABSENT)))
        cfg.use_cache = False
    return saved


_ABSENT = object()  # a config that had no use_cache gets none back


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
    if archs & ORIGINAL_LLAVA_ARCHS:  # no transformers class: load_model reads them via lib/llava_original.py
        raise ModelLoadError(f"{sorted(archs & ORIGINAL_LLAVA_ARCHS)[0]} is an original LLaVA checkpoint: load it "
                             "with load_model (lib/llava_original.py), not a transformers class")
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
    from . import llava_original

    raw = llava_original.read_raw_config(name, cache_dir)
    if llava_original.is_original_llava(raw):
        return _load_original_llava(name, raw, cache_dir, resolve_dtype(dtype, device, checkpoint_dtype(raw)))
    config = _load_config(name, cache_dir)
    cls, multimodal = model_class_for(config)
    stored = checkpoint_dtype(config)
    torch_dtype = resolve_dtype(dtype, device, stored)
    tokenizer = load_tokenizer(name, cache_dir)
    try:
        model = cls.from_pretrained(name, cache_dir=cache_dir, dtype=torch_dtype, low_cpu_mem_usage=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model weights for '{name}': {first}") from exc
    model.eval()
    overrides = _disable_cache(model)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, multimodal=multimodal,
                       save_dtype=stored if dtype == "auto" else torch_dtype, runtime_overrides=overrides)


def save_pretrained_as_loaded(loaded: LoadedModel, folder: str) -> None:
    """``save_pretrained`` of the (pruned) model as the checkpoint was: its dtype (``auto`` computed a bf16
    checkpoint in float32 on the CPU; it goes back as bf16, zeros stay zeros) and its config, without the
    runtime settings of this run (``use_cache: false``). Moves the model to the CPU in that dtype.
    An original LLaVA checkpoint goes back in its own format (lib.llava_original.save_original)."""
    if loaded.original_llava is not None:
        from . import llava_original

        llava_original.save_original(loaded.model, loaded.original_llava, folder)
        return
    model = loaded.model
    model.to("cpu")
    if loaded.save_dtype is not None and next(model.parameters()).dtype != loaded.save_dtype:
        model.to(loaded.save_dtype)
    for cfg, value in loaded.runtime_overrides:
        if value is _ABSENT:
            del cfg.use_cache
        else:
            cfg.use_cache = value
    try:
        model.save_pretrained(folder)
    finally:
        for cfg, _ in loaded.runtime_overrides:
            cfg.use_cache = False


def _load_original_llava(name: str, raw: dict, cache_dir: str | None, torch_dtype: torch.dtype) -> LoadedModel:
    """An original LLaVA checkpoint's language model, loaded as it is stored (no LLaVA package, no vision
    tower download); lib.llava_original.build_multimodal adds the vision side when images are needed."""
    from . import llava_original

    try:
        info = llava_original.describe(name, raw, cache_dir)
        tokenizer = load_tokenizer(info.folder)
        model = llava_original.load_language_model(info, torch_dtype)
    except llava_original.OriginalLlavaError as exc:
        raise ModelLoadError(str(exc)) from exc
    except ModelLoadError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load original LLaVA checkpoint '{name}': {first}") from exc
    logger.info("original LLaVA checkpoint (%s): language model loaded from it as is; vision tower %s is loaded "
                "only for image work", info.arch, info.vision_tower)
    model.eval()
    model.config.use_cache = False
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, multimodal=False, original_llava=info)


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


class DeviceMemoryError(RuntimeError):
    """Even one decoder layer and the calibration buffers do not fit on the device; one line for the user."""


def calib_buffer_bytes(nsamples: int, seqlen: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Device memory of the layer-by-layer calibration buffers: one layer's inputs and outputs for every
    window (``2 x nsamples x seqlen x hidden x dtype bytes``; 2 x 4.3 GB for a 7B model at 128 x 4096)."""
    return 2 * nsamples * seqlen * hidden_size * torch.empty((), dtype=dtype).element_size()


def should_offload(model: nn.Module, device: str, mode: str = "auto", buffer_bytes: int = 0,
                   free_bytes: int | None = None) -> bool:
    """Whether weights stay on the CPU with one decoder layer on ``device`` at a time.

    ``buffer_bytes`` is what the run keeps on the device besides the weights (:func:`calib_buffer_bytes`);
    ``free_bytes`` defaults to the device's free memory. ``on`` offloads on any device (on the CPU the moves
    are no-ops, but the layer-at-a-time path runs, which is how it is tested without a GPU). Raises
    :class:`DeviceMemoryError` when offloading is needed and even one layer plus the buffers do not fit.
    """
    dev = torch.device(device)
    if mode == "off":
        return False
    if free_bytes is None and dev.type == "cuda":
        free_bytes = torch.cuda.mem_get_info(dev)[0]
    if free_bytes is None:  # the CPU holds everything already; no budget to check against
        return mode == "on"
    # Leave room for activations: offload when weights and buffers would take more than 70% of free memory.
    offload = mode == "on" or param_bytes(model) + buffer_bytes > 0.7 * free_bytes
    if offload:
        layers = decoder_layers(model)
        resident = param_bytes(model) - param_bytes(layers)  # embeddings, norm, head, vision tower
        largest = max((param_bytes(layer) for layer in layers), default=0)
        need = resident + largest + buffer_bytes
        if need > 0.9 * free_bytes:
            raise DeviceMemoryError(
                f"one decoder layer with the non-layer weights ({(resident + largest) / 2**30:.2f} GiB) and the "
                f"calibration buffers ({buffer_bytes / 2**30:.2f} GiB) need {need / 2**30:.2f} GiB, "
                f"{device} has {free_bytes / 2**30:.2f} GiB free")
    return offload


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
