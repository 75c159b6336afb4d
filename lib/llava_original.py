"""Original LLaVA checkpoints (``liuhaotian/llava-v1.5-*``, ``llava-v1.6-*``) without the LLaVA package.

The original release stores a LLaMA / Mistral causal LM under ``model.*`` / ``lm_head`` plus the projector
(``model.mm_projector.{0,2}``, and ``model.image_newline`` for 1.6) in one checkpoint whose config
(``architectures: LlavaLlamaForCausalLM`` / ``LlavaMistralForCausalLM``) names the vision tower
(``mm_vision_tower``, a CLIP checkpoint downloaded separately).

- Pruning and text evaluation need only the language model: :func:`load_language_model` loads it from the
  checkpoint as it is (projector and vision keys are left in the files, the vision tower is never fetched).
- Image work (generation, image-text calibration, VQA) needs the whole model: :func:`build_multimodal` wraps
  the *same* language-model modules in transformers' own ``LlavaForConditionalGeneration`` (1.5) or
  ``LlavaNextForConditionalGeneration`` (1.6, ``image_aspect_ratio: anyres``) with the CLIP tower from
  ``mm_vision_tower`` (or a local directory) and the projector weights, mapping the config the way
  transformers' conversion scripts (``convert_llava_weights_to_hf.py``, ``convert_llava_next_weights_to_hf.py``)
  do: ``mm_vision_select_layer`` -> ``vision_feature_layer``, ``mm_vision_select_feature`` patch/cls_patch ->
  ``default``/``full``, ``mlp2x_gelu`` -> ``multi_modal_projector.linear_{1,2}``, ``image_grid_pinpoints``, the
  image newline, an added ``<image>`` token with the embeddings grown to hold it; ``image_aspect_ratio: pad``
  -> ``LlavaImageProcessor(do_pad=True)`` (LLaVA's ``expand2square`` with the image mean as background).
- :func:`save_original` writes the checkpoint back in its own format: the same files, keys, dtypes and
  config, every tensor copied as it was except the decoder layers' weights, which come from the pruned model.
"""
from __future__ import annotations

import copy
import glob
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# architecture class -> the transformers text model family its language model is
ORIGINAL_TEXT_FAMILY = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}
UNSUPPORTED_ORIGINAL = {"LlavaMptForCausalLM"}
IMAGE_TOKEN = "<image>"
# config keys the original LLaVA code adds to the language model's config
_MM_KEYS_PREFIXES = ("mm_", "tune_mm", "freeze_mm", "unfreeze_mm", "use_mm")
_MM_KEYS = {"image_aspect_ratio", "image_grid_pinpoints", "tokenizer_padding_side", "tokenizer_model_max_length",
            "s2", "s2_scales", "vision_tower_lr"}
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


class OriginalLlavaError(RuntimeError):
    """An original LLaVA checkpoint that cannot be used as asked; the message is one line."""


@dataclass
class OriginalLlava:
    """Where an original checkpoint lives and what its config says."""

    folder: str
    raw_config: dict[str, Any]
    text_vocab_size: int  # rows of embed_tokens / lm_head in the checkpoint
    weight_files: dict[str, str] = field(default_factory=dict)  # tensor key -> file name in folder

    @property
    def arch(self) -> str:
        return (self.raw_config.get("architectures") or ["?"])[0]

    @property
    def anyres(self) -> bool:
        """LLaVA-1.6 (NeXT): high-resolution tiles from ``image_grid_pinpoints``."""
        return self.raw_config.get("image_aspect_ratio") == "anyres" or "anyres" in str(
            self.raw_config.get("image_aspect_ratio", ""))

    @property
    def vision_tower(self) -> str | None:
        return self.raw_config.get("mm_vision_tower") or self.raw_config.get("vision_tower")


# --------------------------------------------------------------------------------------------- detection
def read_raw_config(name: str, cache_dir: str | None = None) -> dict[str, Any] | None:
    """The checkpoint's config.json as a dict (local folder, or the hub's file), or None when unavailable."""
    if os.path.isdir(name):
        path = os.path.join(name, "config.json")
    else:
        if name.startswith((".", "/", "~")) or name.count("/") != 1:
            return None
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(name, "config.json", cache_dir=cache_dir)
        except Exception:  # offline or no such repo: the ordinary loading path reports it
            return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_original_llava(raw_config: dict[str, Any] | None) -> bool:
    archs = set((raw_config or {}).get("architectures") or [])
    return bool(archs & (set(ORIGINAL_TEXT_FAMILY) | UNSUPPORTED_ORIGINAL))


def checkpoint_folder(name: str, cache_dir: str | None = None) -> str:
    """A local folder holding the checkpoint's files: ``name`` itself, or the hub snapshot (weights, configs,
    tokenizer; the save-back copies every file of it)."""
    if os.path.isdir(name):
        return name
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, cache_dir=cache_dir,
                                 allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.py"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OriginalLlavaError(f"cannot download '{name}' ({first}); offline nodes need a local path") from exc


def _weight_files(folder: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        files = sorted(f for f in glob.glob(os.path.join(folder, "*.bin")) if "training_args" not in f)
    if not files:
        raise OriginalLlavaError(f"no *.safetensors or *.bin weights in {folder}")
    return files


def _read_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:  # zip-format .bin files map lazily: a 10 GB shard is not read to list its keys
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) format
        return torch.load(path, map_location="cpu", weights_only=True)


def _file_keys(path: str) -> list[str]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    return list(_read_file(path).keys())


def _tensors(info: OriginalLlava, prefix: str) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor whose key starts with ``prefix`` (read from the files that hold them)."""
    out: dict[str, torch.Tensor] = {}
    for fname in sorted({f for k, f in info.weight_files.items() if k.startswith(prefix)}):
        path = os.path.join(info.folder, fname)
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                for k in f.keys():
                    if k.startswith(prefix):
                        out[k] = f.get_tensor(k)
        else:
            out.update({k: v for k, v in _read_file(path).items() if k.startswith(prefix)})
    return out


def describe(name: str, raw_config: dict[str, Any], cache_dir: str | None = None) -> OriginalLlava:
    arch = sorted(set(raw_config.get("architectures") or []))[0]
    if arch in UNSUPPORTED_ORIGINAL:
        raise OriginalLlavaError(f"{arch} (LLaVA on MPT) is not supported; LLaMA- and Mistral-based LLaVA are")
    folder = checkpoint_folder(name, cache_dir)
    weight_files = {}
    files = _weight_files(folder)
    index = [os.path.join(folder, n) for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")]
    index = [p for p in index if os.path.isfile(p) and os.path.basename(p).startswith(
        "model.safetensors" if files[0].endswith(".safetensors") else "pytorch_model")]
    if index:  # the shard index names every key's file; no shard has to be opened
        with open(index[0], encoding="utf-8") as f:
            weight_files = dict(json.load(f)["weight_map"])
    else:
        for path in files:
            for key in _file_keys(path):
                weight_files[key] = os.path.basename(path)
    emb = "model.embed_tokens.weight"
    if emb not in weight_files:
        raise OriginalLlavaError(f"{name}: no {emb} in the checkpoint (not an original LLaVA layout)")
    vocab = int(raw_config.get("vocab_size") or 0)
    return OriginalLlava(folder=folder, raw_config=raw_config, text_vocab_size=vocab, weight_files=weight_files)


# --------------------------------------------------------------------------------------------- language model
def text_config(info: OriginalLlava):
    """The language model's config: the checkpoint's config without LLaVA's keys, as a Llama/Mistral config."""
    import transformers

    family = ORIGINAL_TEXT_FAMILY[info.arch]
    keep = {k: v for k, v in info.raw_config.items()
            if not k.startswith(_MM_KEYS_PREFIXES) and k not in _MM_KEYS
            and k not in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path")}
    cls = transformers.LlamaConfig if family == "llama" else transformers.MistralConfig
    cfg = cls(**keep)
    cfg.architectures = ["LlamaForCausalLM" if family == "llama" else "MistralForCausalLM"]
    return cfg


def load_language_model(info: OriginalLlava, dtype: torch.dtype) -> nn.Module:
    """The LLaMA/Mistral causal LM stored in the checkpoint (``model.*`` and ``lm_head``), loaded as is; the
    projector and any vision-tower keys in the files are not loaded (and stay in them for the save-back)."""
    import transformers

    cfg = text_config(info)
    cls = transformers.LlamaForCausalLM if isinstance(cfg, transformers.LlamaConfig) else \
        transformers.MistralForCausalLM
    # The projector / vision keys are expected extras; keep transformers from warning about each one.
    tf_logger = logging.getLogger("transformers.modeling_utils")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        model = cls.from_pretrained(info.folder, config=cfg, dtype=dtype, low_cpu_mem_usage=True)
    finally:
        tf_logger.setLevel(level)
    if info.text_vocab_size == 0:
        info.text_vocab_size = model.get_input_embeddings().weight.shape[0]
    return model


# --------------------------------------------------------------------------------------------- image work
def _vision_source(info: OriginalLlava, vision_tower: str | None) -> str:
    src = vision_tower or info.vision_tower
    if not src:
        raise OriginalLlavaError("the checkpoint's config names no mm_vision_tower; pass --vision_tower DIR")
    if vision_tower is not None and not os.path.isdir(vision_tower):
        raise OriginalLlavaError(f"--vision_tower {vision_tower} is not a directory")
    return src


def _projector_layers(info: OriginalLlava) -> int:
    kind = info.raw_config.get("mm_projector_type", "linear")
    if kind == "mlp2x_gelu":
        return 2
    raise OriginalLlavaError(f"mm_projector_type '{kind}' has no transformers Llava equivalent (mlp2x_gelu, as in "
                             "LLaVA-1.5/1.6, is supported)")


def add_image_token(model: nn.Module, tokenizer, info: OriginalLlava) -> int:
    """Add ``<image>`` to the tokenizer and grow the embeddings to hold it (rows past the checkpoint's vocabulary
    get the mean-and-covariance init transformers uses; the image token's own row is never read, its positions
    are replaced by image features). Returns the token id. LLaVA pads with ``<unk>``; so does this."""
    from transformers import AddedToken

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens(AddedToken(IMAGE_TOKEN, special=True, normalized=False), special_tokens=True)
    if tokenizer.pad_token is None and tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    rows = model.get_input_embeddings().weight.shape[0]
    if token_id >= rows:
        model.resize_token_embeddings(token_id + 1, mean_resizing=True)
    return token_id


def build_multimodal(language_model: nn.Module, tokenizer, info: OriginalLlava,
                     vision_tower: str | None = None, cache_dir: str | None = None):
    """transformers' Llava(Next)ForConditionalGeneration around ``language_model`` (its modules are shared, not
    copied: pruning one prunes the other) and its processor. ``vision_tower``: a local CLIP folder instead of
    downloading ``mm_vision_tower``."""
    import transformers
    from transformers import CLIPVisionConfig, CLIPVisionModel

    src = _vision_source(info, vision_tower)
    _projector_layers(info)
    dtype = next(language_model.parameters()).dtype
    try:
        vision_cfg = CLIPVisionConfig.from_pretrained(src, cache_dir=cache_dir)
        vision = CLIPVisionModel.from_pretrained(src, cache_dir=cache_dir, dtype=dtype, low_cpu_mem_usage=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OriginalLlavaError(f"cannot load the vision tower '{src}' ({first}); offline nodes: --vision_tower DIR"
                                 ) from exc
    own = _tensors(info, "model.vision_tower.vision_tower.")
    if own:  # checkpoints trained with an unfrozen tower carry its weights: they win over mm_vision_tower's
        vision.load_state_dict({k[len("model.vision_tower.vision_tower."):]: v for k, v in own.items()}, strict=True)
    token_id = add_image_token(language_model, tokenizer, info)
    raw = info.raw_config
    select = raw.get("mm_vision_select_feature", "patch")
    common = dict(
        text_config=language_model.config, vision_config=vision_cfg, image_token_index=token_id,
        vision_feature_layer=int(raw.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy="default" if select == "patch" else "full",
        projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=False,
    )
    if info.anyres:
        pinpoints = raw.get("image_grid_pinpoints")
        if not pinpoints:
            raise OriginalLlavaError("image_aspect_ratio anyres without image_grid_pinpoints in the config")
        if raw.get("mm_patch_merge_type", "spatial_unpad") != "spatial_unpad":
            logger.warning("mm_patch_merge_type %s: transformers' LlavaNext implements spatial_unpad only",
                           raw.get("mm_patch_merge_type"))
        config = transformers.LlavaNextConfig(image_grid_pinpoints=pinpoints, use_image_newline_parameter=True,
                                              **common)
        cls = transformers.LlavaNextForConditionalGeneration
    else:
        config = transformers.LlavaConfig(image_seq_length=(vision_cfg.image_size // vision_cfg.patch_size) ** 2,
                                          **common)
        cls = transformers.LlavaForConditionalGeneration
    with torch.device("meta"):
        mm = cls(config)
    mm.model.language_model = language_model.model
    mm.lm_head = language_model.lm_head
    mm.model.vision_tower = vision
    proj = mm.model.multi_modal_projector.__class__(config).to(dtype)
    tensors = _tensors(info, "model.mm_projector.")
    proj.load_state_dict({"linear_1.weight": tensors["model.mm_projector.0.weight"],
                          "linear_1.bias": tensors["model.mm_projector.0.bias"],
                          "linear_2.weight": tensors["model.mm_projector.2.weight"],
                          "linear_2.bias": tensors["model.mm_projector.2.bias"]}, strict=True)
    mm.model.multi_modal_projector = proj
    if info.anyres:
        newline = _tensors(info, "model.image_newline")
        if "model.image_newline" not in newline:
            raise OriginalLlavaError("LLaVA-1.6 checkpoint without model.image_newline")
        mm.model.image_newline = nn.Parameter(newline["model.image_newline"].to(dtype))
    meta = [n for n, p in list(mm.named_parameters()) + list(mm.named_buffers()) if p.device.type == "meta"]
    if meta:
        raise OriginalLlavaError(f"internal: {len(meta)} tensors left unset building the LLaVA model ({meta[0]})")
    mm.eval()
    mm.config.use_cache = False  # calibration and evaluation pass no cache; generation uses its own config:
    mm.generation_config = copy.deepcopy(language_model.generation_config)  # the LM's (use_cache, bos/eos)
    mm.generation_config.use_cache = True
    return mm, _processor(info, src, tokenizer, vision_cfg, config, cache_dir)


def _processor(info: OriginalLlava, src: str, tokenizer, vision_cfg, config, cache_dir):
    import transformers

    strategy = config.vision_feature_select_strategy
    if info.anyres:
        ip = transformers.LlavaNextImageProcessor.from_pretrained(
            src, cache_dir=cache_dir, image_grid_pinpoints=config.image_grid_pinpoints)
        return transformers.LlavaNextProcessor(image_processor=ip, tokenizer=tokenizer,
                                               patch_size=vision_cfg.patch_size, image_token=IMAGE_TOKEN,
                                               vision_feature_select_strategy=strategy,
                                               num_additional_image_tokens=1)
    pad = info.raw_config.get("image_aspect_ratio") == "pad"
    ip = transformers.LlavaImageProcessor.from_pretrained(src, cache_dir=cache_dir, do_pad=pad)
    return transformers.LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=vision_cfg.patch_size,
                                       image_token=IMAGE_TOKEN, vision_feature_select_strategy=strategy,
                                       num_additional_image_tokens=1)


# --------------------------------------------------------------------------------------------- save back
def original_key(name: str) -> str:
    """A language-model parameter name (of the causal LM or of the Llava wrapper) as the original checkpoint
    spells it: ``model.language_model.X`` -> ``model.X``, ``lm_head.*`` unchanged."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


def save_original(model: nn.Module, info: OriginalLlava, out_dir: str) -> list[str]:
    """Write the checkpoint to ``out_dir`` in its own format: every file of the original folder copied, every
    weight file rewritten with the same keys, dtypes and shapes, the decoder layers' tensors taken from
    ``model`` (pruned), everything else (embeddings, norm, lm_head, projector, image newline) as it was.
    Returns the keys replaced."""
    from .models import decoder_layers, layer_prefix

    prefix = layer_prefix(model)
    state = {original_key(prefix + n): p for n, p in decoder_layers(model).state_dict(prefix="").items()}
    missing = [k for k in state if k not in info.weight_files and not k.endswith("inv_freq")]
    if missing:
        raise OriginalLlavaError(f"decoder tensor {missing[0]} is not in the original checkpoint")
    os.makedirs(out_dir, exist_ok=True)
    weight_names = {os.path.basename(p) for p in _weight_files(info.folder)}
    for entry in os.listdir(info.folder):
        src = os.path.join(info.folder, entry)
        if entry in weight_names or not os.path.isfile(src):
            continue
        shutil.copyfile(src, os.path.join(out_dir, entry))
    replaced = []
    for fname in sorted(weight_names):
        tensors = _read_file(os.path.join(info.folder, fname))
        for key in list(tensors):
            if key in state:
                new = state[key].detach().to("cpu", tensors[key].dtype)
                if new.shape != tensors[key].shape:
                    raise OriginalLlavaError(f"{key}: shape {tuple(new.shape)} is not the checkpoint's "
                                             f"{tuple(tensors[key].shape)}")
                tensors[key] = new.contiguous()
                replaced.append(key)
        path = os.path.join(out_dir, fname)
        if fname.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(tensors, path, metadata={"format": "pt"})
        else:
            torch.save(tensors, path)
        del tensors
    return replaced
