"""Perplexity with Wanda's protocol, and zero-shot tasks through lm-eval-harness (optional).

Protocol (Wanda's ``eval_ppl_wikitext``): the evaluation tokens are cut into ``N // seqlen`` non-overlapping
windows (the tail is dropped); each window's mean next-token loss is multiplied by ``seqlen``, the products
are summed and ``ppl = exp(sum / (windows * seqlen))``.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .layerwise import capture_layer_inputs, run_layer
from .models import decoder, decoder_layers
from .offload import on_device

logger = logging.getLogger(__name__)

ZERO_SHOT_TASKS = ["boolq", "rte", "hellaswag", "winogrande", "arc_challenge", "arc_easy", "openbookqa"]


def windows(input_ids: torch.Tensor, seqlen: int, batch_size: int) -> list[torch.Tensor]:
    """Non-overlapping ``seqlen`` windows of ``[1, N]`` token ids (tail dropped), ``batch_size`` per tensor."""
    n = input_ids.numel() // seqlen
    flat = input_ids.reshape(-1)[: n * seqlen].reshape(n, seqlen)
    return [flat[i : i + batch_size] for i in range(0, n, batch_size)]


def spread_windows(input_ids: torch.Tensor, seqlen: int, n: int) -> torch.Tensor:
    """``n`` of the ``N // seqlen`` windows of ``[1, N]`` ids, evenly spaced over the whole text (window
    ``i * total // n``), as ``[1, n * seqlen]``; all of them when there are no more than ``n``. A search
    objective of the first windows reads one or two articles; spread windows read as many as there are."""
    total = input_ids.numel() // seqlen
    flat = input_ids.reshape(-1)[: total * seqlen].reshape(total, seqlen)
    if n >= total:
        return flat.reshape(1, -1)
    return flat[[i * total // n for i in range(n)]].reshape(1, -1)


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Wanda's per-batch term: mean loss over the shifted tokens times ``seqlen * batch``."""
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return loss * ids.shape[1] * ids.shape[0]


@torch.no_grad()
def eval_ppl(
    model: nn.Module, input_ids: torch.Tensor, seqlen: int, device: torch.device | str = "cpu",
    batch_size: int = 1, offload: bool = False, desc: str = "ppl", max_windows: int | None = None,
) -> float:
    """Perplexity of ``input_ids`` (``[1, N]``), Wanda's protocol.

    With ``offload`` the weights stay on the CPU and the windows go through the model one decoder layer at
    a time (the pruning capture path), so a model larger than the device still evaluates.
    """
    if max_windows is not None:
        input_ids = input_ids[:, : max_windows * seqlen]
    batches = windows(input_ids, seqlen, batch_size)
    nwin = sum(b.shape[0] for b in batches)
    if nwin == 0:
        raise ValueError(f"evaluation text has {input_ids.numel()} tokens, fewer than one {seqlen}-token window")
    logger.info("evaluating %s on %d windows of %d tokens", desc, nwin, seqlen)
    if offload:
        total = nll_layerwise(model, batches, device, desc)
    else:
        total = torch.zeros((), dtype=torch.float64)
        for ids in tqdm(batches, desc=desc, leave=False):
            ids = ids.to(device)
            total += window_nll(model(input_ids=ids, use_cache=False).logits, ids).double().cpu()
    return float(torch.exp(total / (nwin * seqlen)))


def nll_layerwise(model: nn.Module, batches: list[torch.Tensor], device, desc: str) -> torch.Tensor:
    """Summed :func:`window_nll` of ``batches`` with one decoder layer on ``device`` at a time (offloaded
    models): all windows go through a layer before the next one is moved in."""
    inputs = capture_layer_inputs(model, batches, device, store_device="cpu")
    for layer in tqdm(decoder_layers(model), desc=f"{desc} (layers)", leave=False):
        with on_device(layer, device):
            inputs.hidden = run_layer(layer, inputs, device)
    norm, head = decoder(model).norm, model.get_output_embeddings()
    total = torch.zeros((), dtype=torch.float64)
    for h, ids in zip(inputs.hidden, batches):
        logits = head(norm(h.to(device)))
        total += window_nll(logits, ids.to(device)).double().cpu()
    return total


def run_evaluations(model: nn.Module, kv, evaluations: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Run every evaluation of a run inside one KV-quantization simulation (``kv``: a
    :class:`lib.kvquant.KVQuantConfig` or None), so perplexity and zero-shot numbers describe the same model."""
    from .kvquant import simulate_kv_quant

    with simulate_kv_quant(model, kv):
        return {name: fn() for name, fn in evaluations.items()}


def eval_zero_shot(model: nn.Module, tokenizer, tasks: list[str] | None = None, batch_size: int = 1,
                   num_fewshot: int = 0) -> dict:
    """Accuracy on Wanda's seven zero-shot tasks through lm-eval-harness (``pip install lm-eval``); the result
    records the KV quantization simulated while it ran (``kv``: None for full precision)."""
    from lm_eval import simple_evaluate  # imported here: an optional dependency
    from lm_eval.models.huggingface import HFLM

    from .kvquant import active_kv_simulation

    kv = active_kv_simulation(model)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(model=lm, tasks=tasks or ZERO_SHOT_TASKS, num_fewshot=num_fewshot)
    out = {task: res for task, res in results["results"].items()}
    out["kv"] = None if kv is None else kv.describe()
    return out
