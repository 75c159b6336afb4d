"""The search objective, scored window by window so a pruner can stop a hopeless trial early.

``ppl``: perplexity of the objective windows with Wanda's protocol (each batch's mean loss times its tokens,
summed in float64, in window order), so the value over all windows is bit-for-bit :func:`lib.eval.eval_ppl`.
``kl``: mean over tokens of KL(dense || current) of the next-token distributions. The dense model's
log-probabilities are computed once and kept on disk as float16 (a memory map in a temporary folder), and a
trial reads one window at a time: memory never holds more than one window's logits.

Image-text objectives (LLaVA): ``ids`` may instead be a list of windows of different lengths carrying their
pixel inputs (:mod:`lib.mmdata`); each runs the full multimodal forward and the perplexity is over the text
tokens only (image positions are not predicted), the image-conditioned loss of :func:`lib.mmdata.image_text_nll`.

After every ``report_every`` windows the running value (over the windows scored so far, the same windows in
the same order for every trial, so values at one step compare) goes to ``report(step, value)``; when
``should_stop()`` answers true the evaluation ends early and :class:`Stopped` carries how far it got.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .eval import nll_layerwise, window_nll, windows
from .search_config import SearchError

logger = logging.getLogger(__name__)


class Stopped(Exception):
    """The pruner stopped the trial after ``windows`` windows."""

    def __init__(self, windows: int):
        super().__init__(f"stopped after {windows} windows")
        self.windows = windows


class Objective:
    def __init__(self, model: nn.Module, ids: torch.Tensor | list[torch.Tensor], seqlen: int, nsamples: int, device,
                 offload: bool, kind: str = "ppl", batch_size: int = 1, report_every: int | None = None,
                 workdir: str | None = None):
        self.model, self.seqlen, self.device, self.offload = model, seqlen, device, offload
        self.kind, self.batch_size = kind, batch_size
        self.image_text = isinstance(ids, (list, tuple))
        if self.image_text:
            if kind != "ppl" or offload:
                raise SearchError("an image-text objective is image-conditioned perplexity with the model on the "
                                  "device (--objective ppl, --offload off)")
            if not ids:
                raise SearchError("the image-text objective has no windows")
            self.batch_size = batch_size = 1
            ids = list(ids)[:nsamples]
            if len(ids) < nsamples:
                logger.warning("objective data holds %d windows; using %d, not %d", len(ids), len(ids), nsamples)
            self.nwin, self.ids, self.batches = len(ids), None, ids
        else:
            self._text_windows(ids, nsamples)
        # Rungs: about eight reports per evaluation, on batch boundaries.
        per = report_every or max(1, self.nwin // 8)
        self.rungs = sorted({min(self.nwin, max(batch_size, (r // batch_size) * batch_size))
                             for r in range(per, self.nwin + per, per)} | {self.nwin})
        self._dense_dir = self._dense = None
        if kind == "kl":
            self._store_dense_logprobs(workdir)

    def _text_windows(self, ids: torch.Tensor, nsamples: int) -> None:
        seqlen = self.seqlen
        self.nwin = min(nsamples, ids.numel() // seqlen)
        if self.nwin < 1:
            raise SearchError(f"objective text has {ids.numel()} tokens, fewer than one {seqlen}-token window")
        if self.nwin < nsamples:
            logger.warning("objective text holds %d windows of %d tokens; using %d, not %d",
                           self.nwin, seqlen, self.nwin, nsamples)
        self.ids = ids[:, : self.nwin * seqlen]
        self.batches = windows(self.ids, seqlen, self.batch_size)

    # ------------------------------------------------------------------ dense distribution (kl)
    @torch.no_grad()
    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        if self.offload:
            raise SearchError("--objective kl needs the model on the device (use --offload off or ppl)")
        return self.model(input_ids=batch.to(self.device), use_cache=False).logits

    def _store_dense_logprobs(self, workdir: str | None) -> None:
        self._dense_dir = tempfile.mkdtemp(prefix="optspa-dense-logp-", dir=workdir)
        vocab = None
        row = 0
        for batch in self.batches:
            logp = F.log_softmax(self._logits(batch).float(), dim=-1)
            if self._dense is None:
                vocab = logp.shape[-1]
                path = os.path.join(self._dense_dir, "dense_logp.f16")
                self._dense = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16,
                                                        shape=(self.nwin, self.seqlen, vocab))
            self._dense[row: row + batch.shape[0]] = logp.half().cpu().numpy()
            row += batch.shape[0]
        self._dense.flush()
        logger.info("dense log-probabilities of %d windows on disk (%.1f MiB) in %s", self.nwin,
                    self._dense.nbytes / 2**20, self._dense_dir)

    def close(self) -> None:
        """Remove the dense log-probabilities from disk."""
        self._dense = None
        if self._dense_dir is not None:
            shutil.rmtree(self._dense_dir, ignore_errors=True)
            self._dense_dir = None

    def __del__(self):  # a forgotten close must not leave gigabytes behind
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _batch_terms(self, batches: list[torch.Tensor], start: int) -> list[tuple[float, int]]:
        """(sum of the batch's objective terms, token count) per batch, in order."""
        if self.image_text:
            from .mmdata import image_text_nll

            return [image_text_nll(self.model, [w], self.device) for w in batches]
        if self.kind == "ppl":
            if self.offload:  # layer by layer: one chunk at a time through the capture path
                total = nll_layerwise(self.model, batches, self.device, "objective")
                return [(float(total), sum(b.numel() for b in batches))]
            return [(float(window_nll(self._logits(b), b.to(self.device)).double().cpu()), b.numel())
                    for b in batches]
        out, row = [], start
        for b in batches:
            cur = F.log_softmax(self._logits(b).float(), dim=-1)
            dense = torch.from_numpy(np.asarray(self._dense[row: row + b.shape[0]])).to(cur.device).float()
            out.append((float((dense.exp() * (dense - cur)).sum(dtype=torch.float64)), b.shape[0] * b.shape[1]))
            row += b.shape[0]
        return out

    def value_of(self, total: float, tokens: int) -> float:
        if self.kind == "ppl":  # Wanda's protocol: windows x seqlen tokens (text tokens of image windows)
            return float(torch.exp(torch.tensor(total, dtype=torch.float64) / tokens))
        return total / tokens

    def __call__(self, report: Callable[[int, float], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> float:
        total = torch.zeros((), dtype=torch.float64)
        tokens = done = 0
        b = 0
        for rung in self.rungs:
            chunk = []
            while b < len(self.batches) and done + sum(x.shape[0] for x in chunk) < rung:
                chunk.append(self.batches[b])
                b += 1
            for term, n in self._batch_terms(chunk, done):
                total += term
                tokens += n
            done += sum(x.shape[0] for x in chunk)
            value = self.value_of(float(total), tokens)
            if not math.isfinite(value):
                value = float("inf")
            if done < self.nwin and report is not None:
                report(done, value)
                if should_stop is not None and should_stop():
                    raise Stopped(done)
        return value
