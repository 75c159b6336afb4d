"""Head scores by SparseMM's rule: a head scores when its top-1 attended key falls on the chunk a token came from.

Rule (per sample): at each generated token that occurs in exactly one chunk of the context, every query head whose
top-1 attended key (for the query that produced the token) lies in that chunk's positions scores
``1 / (positions in the chunk)``; a head's sample score is the sum over the sample's tokens, and its head score the
mean over samples.  Results are ``{(layer, head): [score per sample]}``, written in SparseMM's JSON layout by
:func:`lib.kvbudget.save_head_scores`.

* :func:`visual_head_scores` (LLaVA-1.5 layout): greedy generation on OCR-style probe images
  (:mod:`lib.probe_images`); chunks are the image patches under each word's box, a generated token "occurs" in a
  chunk when its text (at least ``min_chars`` characters, SparseMM skips shorter ones) is part of the word.
* :func:`copy_head_scores` (any LLaMA-family causal LM): a copy/retrieval probe, a random run of distinct tokens
  followed by the same run, teacher-forced; a chunk is one position of the first run, so a head scores 1 when the
  model predicts a token of the run and the head's top-1 key is that token's position in the first run.

Top-1 keys are recorded by an attention function registered as ``"optspa_headprobe"`` (sdpa output, plus the
argmax of each head's attention logits), switched on for the language model only inside the probe.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .models import text_config
from .probe_images import ProbeImage, box_patches

logger = logging.getLogger(__name__)

PROBE_NAME = "optspa_headprobe"
_REC = threading.local()


def _probe_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                 **kwargs)
    rec = getattr(_REC, "top1", None)
    if rec is not None:
        groups = query.shape[1] // key.shape[1]
        logits = torch.matmul(query.float(), key.float().repeat_interleave(groups, dim=1).transpose(-1, -2))
        q_len, kv_len = query.shape[2], key.shape[2]
        qpos = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
        logits = logits.masked_fill(torch.arange(kv_len, device=query.device)[None, :] > qpos, float("-inf"))
        rec[module.layer_idx] = logits.argmax(dim=-1)  # [B, heads, q] absolute key positions
    return out


AttentionInterface.register(PROBE_NAME, _probe_attention)
AttentionMaskInterface.register(PROBE_NAME, sdpa_mask)


@contextmanager
def record_top1(model: nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block every forward fills ``{layer: [B, heads, q] top-1 key positions}`` (batch 1, no padding)."""
    lm = model.get_decoder() if hasattr(model, "get_decoder") else model
    before = lm.config._attn_implementation
    rec: dict[int, torch.Tensor] = {}
    lm.set_attn_implementation(PROBE_NAME)
    _REC.top1 = rec
    try:
        yield rec
    finally:
        _REC.top1 = None
        lm.set_attn_implementation(before)


def _dims(model: nn.Module) -> tuple[int, int]:
    cfg = text_config(model)
    return cfg.num_hidden_layers, cfg.num_attention_heads


def _score_step(scores: torch.Tensor, top1: dict[int, torch.Tensor], query: int, positions: torch.Tensor) -> None:
    """Add ``1 / len(positions)`` to every head whose top-1 key at ``query`` is in ``positions``."""
    for layer, t in top1.items():
        hit = torch.isin(t[0, :, query], positions)
        scores[layer] += hit.double() / positions.numel()


def _collect(per_sample: list[torch.Tensor]) -> dict[tuple[int, int], list[float]]:
    stacked = torch.stack(per_sample)  # [samples, L, H]
    _, n_layers, n_heads = stacked.shape
    return {(l, h): stacked[:, l, h].tolist() for l in range(n_layers) for h in range(n_heads)}


@torch.inference_mode()
def copy_head_scores(
    model: nn.Module, n_samples: int = 8, length: int = 128, seed: int = 0, low: int | None = None,
    high: int | None = None,
) -> dict[tuple[int, int], list[float]]:
    """Copy/retrieval probe (see the module docstring): ``n_samples`` runs of ``length`` distinct token ids drawn
    from ``[low, high)`` (default: the upper 90% of the vocabulary, away from special tokens), repeated once."""
    cfg = text_config(model)
    n_layers, n_heads = _dims(model)
    high = cfg.vocab_size if high is None else high
    low = max(cfg.vocab_size // 10, 8) if low is None else low
    if high - low < length:
        raise ValueError(f"copy probe needs {length} distinct tokens in [{low}, {high})")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    bos = getattr(cfg, "bos_token_id", None)
    prefix = [bos] if isinstance(bos, int) else []
    per_sample = []
    for _ in range(n_samples):
        run = (torch.randperm(high - low, generator=g)[:length] + low).tolist()
        ids = torch.tensor([prefix + run + run], device=device)
        with record_top1(model) as top1:
            pred = model(ids, use_cache=False).logits[0].argmax(-1)
        scores = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        start = len(prefix) + length - 1  # last token of the first run predicts the first of the second
        for p in range(start, ids.shape[1] - 1):
            where = torch.nonzero(ids[0, : p + 1] == pred[p]).flatten()
            if where.numel() == 1:
                _score_step(scores, top1, p, where)
        per_sample.append(scores)
    logger.info("copy probe: %d samples of %d tokens", n_samples, length)
    return _collect(per_sample)


def _image_token_id(model: nn.Module) -> int:
    cfg = model.config
    tok = getattr(cfg, "image_token_id", None)
    if tok is None:
        tok = getattr(cfg, "image_token_index", None)
    if tok is None:
        raise ValueError("the visual-head probe needs a LLaVA model (config has no image token id)")
    return int(tok)


@torch.inference_mode()
def visual_head_scores(
    model: nn.Module,
    processor,
    samples: list[ProbeImage],
    prompt: str = "USER: <image>\nRead the words in the image. ASSISTANT:",
    max_new_tokens: int = 32,
    min_chars: int = 3,
) -> dict[tuple[int, int], list[float]]:
    """SparseMM's visual-head rule on probe images (square, LLaVA-1.5 layout: one grid of image tokens)."""
    n_layers, n_heads = _dims(model)
    image_token = _image_token_id(model)
    device = next(model.parameters()).device
    tokenizer = processor.tokenizer
    eos = getattr(tokenizer, "eos_token_id", None)
    per_sample = []
    for sample in samples:
        if sample.image.width != sample.image.height:
            raise ValueError("visual-head probe images must be square")
        inputs = processor(text=prompt, images=sample.image, return_tensors="pt").to(device)
        ids = inputs["input_ids"]
        image_pos = torch.nonzero(ids[0] == image_token).flatten()
        grid = math.isqrt(image_pos.numel())
        if grid == 0 or grid * grid != image_pos.numel():
            raise ValueError(f"{image_pos.numel()} image tokens are not one square grid (LLaVA-1.5 layout only)")
        chunk_pos = [image_pos[box_patches(c.box, sample.image.width, grid)] for c in sample.chunks]
        words = [c.text.lower() for c in sample.chunks]
        scores = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        cache = DynamicCache(config=model.config)
        with record_top1(model) as top1:
            logits = model(**inputs, past_key_values=cache, use_cache=True).logits
            for _ in range(max_new_tokens):
                tok = int(logits[0, -1].argmax())
                if tok == eos:
                    break
                text = tokenizer.decode([tok]).strip().lower()
                hits = [i for i, w in enumerate(words) if len(text) >= min_chars and text in w]
                if len(hits) == 1:
                    _score_step(scores, top1, -1, chunk_pos[hits[0]])
                logits = model(input_ids=torch.tensor([[tok]], device=device), past_key_values=cache,
                               use_cache=True).logits
        per_sample.append(scores)
    logger.info("visual-head probe: %d images", len(samples))
    return _collect(per_sample)


def head_score_tensor(per_sample: dict[tuple[int, int], list[float]], num_layers: int, num_heads: int) -> torch.Tensor:
    """Mean over samples as ``[num_layers, num_heads]`` float64."""
    out = torch.zeros(num_layers, num_heads, dtype=torch.float64)
    for (l, h), v in per_sample.items():
        out[l, h] = sum(v) / len(v) if v else 0.0
    return out


def probe_head_scores(
    model: nn.Module, processor=None, probe: str = "auto", n_samples: int = 8, seed: int = 0
) -> dict[tuple[int, int], list[float]]:
    """Head scores by ``probe``: ``"visual"`` (LLaVA-1.5: probe images at the processor's crop size, needs the
    ``processor``), ``"copy"`` (any causal LM), or ``"auto"`` (visual when a processor with images is given)."""
    from .probe_images import generate_probe_images

    if probe == "auto":
        probe = "visual" if processor is not None and hasattr(processor, "image_processor") else "copy"
    if probe == "copy":
        return copy_head_scores(model, n_samples=n_samples, seed=seed)
    if probe != "visual":
        raise ValueError(f"unknown head probe {probe!r}; choose auto, copy or visual")
    if processor is None or not hasattr(processor, "image_processor"):
        raise ValueError("the visual head probe needs a LLaVA model with its processor")
    crop = getattr(processor.image_processor, "crop_size", None) or {}
    size = int(crop.get("height") or 336) if isinstance(crop, dict) else int(getattr(crop, "height", 336) or 336)
    samples = generate_probe_images(n_samples, size=size, seed=seed)
    return visual_head_scores(model, processor, samples)
