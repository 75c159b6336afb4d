"""The packed KV cache on a prompt with an image: bytes per token, and greedy generation with the real cache
against generation under the simulation hooks (lib.kvquant), for any LLaVA model in memory."""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .kvquant import KVQuantConfig, PackedQuantizedCache, kv_memory_report, simulate_kv_quant

logger = logging.getLogger(__name__)


@torch.no_grad()
def image_prompt_kv(model: nn.Module, processor, image, text: str, cfg: KVQuantConfig, max_new_tokens: int = 16,
                    device: str | torch.device = "cpu") -> dict[str, Any]:
    """Greedy generation for ``text`` (containing ``<image>``) and ``image`` with a :class:`PackedQuantizedCache`
    and again under :func:`simulate_kv_quant`; returns the token counts, the cache's stored bytes per token
    (measured, after generation), the configured bytes per token and float16's, and whether the two generations
    are equal token for token."""
    enc = {k: v.to(device) for k, v in processor(images=image, text=text, return_tensors="pt").items()}
    image_id = model.config.image_token_index
    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    cache = PackedQuantizedCache.for_model(model, cfg)
    real = model.generate(**enc, past_key_values=cache, max_new_tokens=max_new_tokens, do_sample=False,
                          min_new_tokens=max_new_tokens, pad_token_id=pad)
    with simulate_kv_quant(model, cfg):
        sim = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens,
                             pad_token_id=pad)
    report = kv_memory_report(cfg, model)
    prompt_len = int(enc["input_ids"].shape[1])
    out = {
        "prompt_tokens": prompt_len,
        "image_tokens": int((enc["input_ids"] == image_id).sum()),
        "generated_tokens": int(real.shape[1] - prompt_len),
        "cached_tokens": int(cache.get_seq_length()),
        "kv_bytes_per_token_measured": cache.bytes_per_token(),
        "kv_bytes_per_token_configured": report["kv_bytes_per_token"],
        "fp16_bytes_per_token": report["fp16_bytes_per_token"],
        "ratio_to_fp16": cache.bytes_per_token() / report["fp16_bytes_per_token"],
        "real_equals_simulation": bool(torch.equal(real, sim)),
        "text": tok.decode(real[0, prompt_len:], skip_special_tokens=True),
    }
    logger.info("KV cache with an image (%s): %d prompt tokens (%d image), %.1f bytes per token stored "
                "(%.3fx float16); real cache %s simulation", cfg.describe(), out["prompt_tokens"], out["image_tokens"],
                out["kv_bytes_per_token_measured"], out["ratio_to_fp16"],
                "equals" if out["real_equals_simulation"] else "DIFFERS FROM")
    return out
