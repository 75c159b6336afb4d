"""Head-wise KV-cache budgets (SparseMM) and SnapKV token selection.

Head scores
-----------
A head score is a non-negative number per (decoder layer, attention head); higher means the head needs more of the
context.  They are stored in SparseMM's JSON layout, ``{"LAYER-HEAD": [score of sample 1, score of sample 2, ...]}``
(one list per query head, averaged on load), which is what :mod:`lib.headscores` writes and what SparseMM publishes.

Allocation (SparseMM)
---------------------
``budget`` is the number of tokens each KV head keeps after prefill *including* the observation window of the
``window`` most recent tokens, as in SparseMM and SnapKV.  The rest, ``base = budget - window`` per head, is split:

* every KV head gets the uniform floor ``int(base * floor_ratio)`` (``floor_ratio`` 0.1 by default);
* the remainder of the whole model, ``(base - floor) * layers * kv_heads``, is shared in proportion to the head
  scores normalised to sum 1 over all query heads and summed over the query heads of each GQA group.

Shares are rounded with the largest-remainder rule (ties: lower layer, then lower head), so the total is exactly
``base * layers * kv_heads`` (SparseMM rounds each head to nearest, which can miss the total by a few tokens).  With
uniform scores every KV head gets exactly ``base``: SnapKV.

Token selection (SnapKV)
------------------------
After prefill of ``T`` tokens, the queries of the last ``w = min(window, T)`` positions attend (softmax over all
keys, causal inside the window) to the first ``T - w`` keys; the attention is summed over the window queries,
averaged over the query heads of each GQA group, and pooled along tokens (``avgpool`` or ``maxpool``, ``kernel``
wide, stride 1, zero padding ``kernel // 2``).  KV head ``h`` keeps its ``capacity[h]`` highest-scoring positions
(ties: earlier position first; all ``T - w`` if the capacity is larger) plus the window, in position order.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

POOLINGS = ("avgpool", "maxpool")


# --------------------------------------------------------------------------------------------------------------
# Head scores: SparseMM's JSON layout
# --------------------------------------------------------------------------------------------------------------
def scores_to_json(per_sample: dict[tuple[int, int], list[float]]) -> dict[str, list[float]]:
    """``{(layer, head): [scores]} -> {"layer-head": [scores]}`` ordered by layer then head."""
    return {f"{l}-{h}": [float(s) for s in v] for (l, h), v in sorted(per_sample.items())}


def save_head_scores(path: str, per_sample: dict[tuple[int, int], list[float]]) -> None:
    """Write per-sample head scores in SparseMM's layout (atomically)."""
    from .io import write_json

    write_json(path, scores_to_json(per_sample))


def head_scores_from_json(data: dict, num_layers: int, num_heads: int) -> torch.Tensor:
    """Mean score per head as a float64 ``[num_layers, num_heads]`` tensor from SparseMM's layout.

    A value may be a list of per-sample scores (averaged; empty = 0) or a single number.  Every head of the model
    must be present exactly once and no other key; raises ``ValueError`` (one line) otherwise."""
    if not isinstance(data, dict) or not data:
        raise ValueError("head scores must be a non-empty JSON object {\"layer-head\": [scores]}")
    out = torch.full((num_layers, num_heads), float("nan"), dtype=torch.float64)
    for key, value in data.items():
        parts = str(key).split("-")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"head score key {key!r} is not LAYER-HEAD")
        layer, head = int(parts[0]), int(parts[1])
        if not (0 <= layer < num_layers and 0 <= head < num_heads):
            raise ValueError(f"head score key {key!r} is outside the model ({num_layers} layers x {num_heads} heads)")
        vals = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
            raise ValueError(f"head score {key!r} has non-numeric or non-finite values")
        out[layer, head] = sum(vals) / len(vals) if vals else 0.0
    if torch.isnan(out).any():
        missing = [f"{l}-{h}" for l, h in torch.nonzero(torch.isnan(out)).tolist()]
        raise ValueError(f"head scores miss {len(missing)} head(s), e.g. {missing[0]}")
    if (out < 0).any():
        raise ValueError("head scores must be non-negative")
    return out


def load_head_scores(path: str, num_layers: int, num_heads: int) -> torch.Tensor:
    """Read a SparseMM-layout JSON file; see :func:`head_scores_from_json`."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read head scores {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"head scores {path} are not valid JSON: {exc.msg} at line {exc.lineno}") from exc
    return head_scores_from_json(data, num_layers, num_heads)


# --------------------------------------------------------------------------------------------------------------
# Allocation
# --------------------------------------------------------------------------------------------------------------
def _largest_remainder(raw: torch.Tensor, total: int) -> torch.Tensor:
    """Integers ``>= floor(raw)`` summing to ``total`` (largest fractional parts first, ties by flat index)."""
    flat = raw.flatten()
    base = torch.floor(flat)
    short = int(total - int(base.sum().item()))
    frac = flat - base
    out = base.to(torch.long)
    if short > 0:
        order = torch.sort(-frac, stable=True).indices[:short]
        out[order] += 1
    elif short < 0:  # only from float round-off: take back from the smallest fractions
        order = torch.sort(frac, stable=True).indices[: -short]
        out[order] -= 1
    return out.view_as(raw).clamp_(min=0)


def allocate_budgets(
    scores: torch.Tensor | None,
    budget: int,
    window: int,
    num_layers: int,
    num_kv_heads: int,
    floor_ratio: float = 0.1,
) -> torch.Tensor:
    """Non-window capacity per KV head, ``[num_layers, num_kv_heads]`` long (see the module docstring).

    ``scores``: ``[num_layers, num_heads]`` query-head scores (``num_heads`` a multiple of ``num_kv_heads``), or
    ``None`` for SnapKV's uniform budgets.  Each KV head then keeps ``capacity + window`` tokens."""
    if budget <= 0 or window < 0 or budget < window:
        raise ValueError(f"kv budget {budget} must be positive and at least the window ({window})")
    if not 0.0 <= floor_ratio <= 1.0:
        raise ValueError(f"budget floor ratio {floor_ratio} must be in [0, 1]")
    base = budget - window
    if scores is None:
        return torch.full((num_layers, num_kv_heads), base, dtype=torch.long)
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.dim() != 2 or scores.shape[0] != num_layers or scores.shape[1] % num_kv_heads:
        raise ValueError(f"head scores of shape {tuple(scores.shape)} do not fit {num_layers} layers with "
                         f"{num_kv_heads} KV heads")
    if (scores < 0).any() or not torch.isfinite(scores).all():
        raise ValueError("head scores must be finite and non-negative")
    total = float(scores.sum())
    if total <= 0:
        raise ValueError("head scores are all zero; nothing to allocate by")
    groups = scores.shape[1] // num_kv_heads
    share = (scores / total).view(num_layers, num_kv_heads, groups).sum(-1)
    floor = int(base * floor_ratio)
    remain = (base - floor) * num_layers * num_kv_heads
    return _largest_remainder(share * remain + floor, base * num_layers * num_kv_heads)


def redistribute_capped(capacities: torch.Tensor, max_capacity: int, floor: int = 0) -> torch.Tensor:
    """Cap every head at ``max_capacity`` (the prompt's non-window tokens) and re-share what the capped heads cannot
    use among the others in proportion to their allocation above the floor (water-filling, exact integer total
    ``min(sum, max_capacity * heads)``).  SparseMM leaves that excess unused; uniform capacities are only clamped."""
    caps = capacities.to(torch.float64)
    total = min(int(capacities.sum()), max_capacity * capacities.numel())
    weights = (caps - floor).clamp(min=0)
    out = caps.clone()
    capped = torch.zeros_like(out, dtype=torch.bool)
    for _ in range(out.numel()):
        over = (out > max_capacity) & ~capped
        if not over.any():
            break
        excess = float((out[over] - max_capacity).sum())
        out[over] = float(max_capacity)
        capped |= over
        free = ~capped
        if not free.any():
            break
        w = weights * free
        if float(w.sum()) <= 0:
            w = free.to(torch.float64)
        out += excess * w / w.sum()
    return _largest_remainder(out, total).clamp_(max=max_capacity)


@dataclass
class KVBudgetConfig:
    """What the eviction cache needs: per-KV-head capacities (non-window tokens kept) and the selection rule."""

    budget: int
    capacities: list[list[int]]  # [layer][kv head]
    window: int = 32
    kernel: int = 7
    pooling: str = "maxpool"
    floor_ratio: float = 0.1
    source: str = "uniform"  # "uniform" (SnapKV) or where the head scores came from
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.capacities = [[int(c) for c in row] for row in self.capacities]
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose from {list(POOLINGS)}")
        if self.kernel <= 0 or self.kernel % 2 == 0:
            raise ValueError(f"pooling kernel {self.kernel} must be a positive odd number")
        if self.window < 0:
            raise ValueError(f"observation window must be >= 0, got {self.window}")

    @classmethod
    def build(
        cls,
        budget: int,
        num_layers: int,
        num_kv_heads: int,
        scores: torch.Tensor | None = None,
        window: int = 32,
        floor_ratio: float = 0.1,
        source: str | None = None,
        **kwargs,
    ) -> KVBudgetConfig:
        caps = allocate_budgets(scores, budget, window, num_layers, num_kv_heads, floor_ratio)
        return cls(budget=budget, capacities=caps.tolist(), window=window, floor_ratio=floor_ratio,
                   source=source or ("uniform" if scores is None else "head_scores"), **kwargs)

    @property
    def num_layers(self) -> int:
        return len(self.capacities)

    @property
    def floor(self) -> int:
        return int(max(self.budget - self.window, 0) * self.floor_ratio)

    def capacities_for(self, prompt_len: int) -> torch.Tensor:
        """Non-window tokens each KV head keeps after a prefill of ``prompt_len`` tokens, ``[layers, kv_heads]``:
        the allocation, capped by the tokens available and re-shared (:func:`redistribute_capped`)."""
        cached = getattr(self, "_for_len", None)
        if cached is not None and cached[0] == prompt_len:
            return cached[1]
        avail = prompt_len - min(self.window, prompt_len)
        caps = redistribute_capped(torch.tensor(self.capacities, dtype=torch.long), avail, self.floor)
        self._for_len = (prompt_len, caps)
        return caps

    def kept(self, prompt_len: int) -> torch.Tensor:
        """Tokens each KV head holds right after a prefill of ``prompt_len`` tokens, ``[layers, kv_heads]``."""
        return self.capacities_for(prompt_len) + min(self.window, prompt_len)

    def validate(self, num_layers: int, num_kv_heads: int) -> KVBudgetConfig:
        if len(self.capacities) != num_layers or any(len(r) != num_kv_heads for r in self.capacities):
            raise ValueError(f"kv budget has {len(self.capacities)} layers x "
                             f"{len(self.capacities[0]) if self.capacities else 0} KV heads; the model has "
                             f"{num_layers} x {num_kv_heads}")
        if any(c < 0 for r in self.capacities for c in r):
            raise ValueError("kv budget capacities must be >= 0")
        return self

    def to_dict(self) -> dict:
        return {"budget": self.budget, "window": self.window, "kernel": self.kernel, "pooling": self.pooling,
                "floor_ratio": self.floor_ratio, "source": self.source, "capacities": self.capacities,
                "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict) -> KVBudgetConfig:
        return cls(budget=int(data["budget"]), capacities=data["capacities"], window=int(data.get("window", 32)),
                   kernel=int(data.get("kernel", 7)), pooling=data.get("pooling", "maxpool"),
                   floor_ratio=float(data.get("floor_ratio", 0.1)), source=data.get("source", "uniform"),
                   meta=data.get("meta") or {})

    def describe(self) -> str:
        caps = torch.tensor(self.capacities, dtype=torch.float64)
        return (f"kv_budget[{self.budget}/head window={self.window} {self.pooling}{self.kernel} {self.source} "
                f"capacity min/mean/max {int(caps.min())}/{caps.mean():.1f}/{int(caps.max())}]")


# --------------------------------------------------------------------------------------------------------------
# SnapKV scoring and selection
# --------------------------------------------------------------------------------------------------------------
def snapkv_scores(
    query: torch.Tensor, key: torch.Tensor, window: int, kernel: int, pooling: str, scaling: float
) -> torch.Tensor:
    """Pooled window attention ``[B, kv_heads, T - w]`` for the first ``T - w`` keys.

    ``query``: ``[B, heads, >= w, D]`` (the last ``w`` rows are the window queries, at positions ``T - w .. T - 1``);
    ``key``: ``[B, kv_heads, T, D]``, both after RoPE."""
    b, hq, _, d = query.shape
    hkv, t = key.shape[1], key.shape[2]
    w = min(window, t)
    groups = hq // hkv
    q = query[:, :, -w:, :].float()
    k = key.float().repeat_interleave(groups, dim=1)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scaling  # [B, Hq, w, T]
    qpos = torch.arange(t - w, t, device=key.device).unsqueeze(-1)
    logits = logits.masked_fill(torch.arange(t, device=key.device) > qpos, float("-inf"))
    attn = logits.softmax(dim=-1)[..., : t - w].sum(dim=-2)  # [B, Hq, T - w]
    attn = attn.view(b, hkv, groups, t - w).mean(dim=2)
    if t - w == 0:
        return attn
    pool = F.avg_pool1d if pooling == "avgpool" else F.max_pool1d
    return pool(attn, kernel_size=kernel, stride=1, padding=kernel // 2)


def select_kept(scores: torch.Tensor, capacities: list[int], total_len: int) -> list[torch.Tensor]:
    """Per KV head, the kept positions (ascending): top-``capacity`` of ``scores [B, kv_heads, T - w]`` (ties: earlier
    first) plus the window ``T - w .. T - 1``.  Returns one ``[B, kept_h]`` long tensor per KV head."""
    b, hkv, n = scores.shape
    window = torch.arange(n, total_len, device=scores.device).expand(b, -1)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices if n else None
    out = []
    for h in range(hkv):
        c = min(int(capacities[h]), n)
        top = order[:, h, :c].sort(dim=-1).values if c else window[:, :0]
        out.append(torch.cat([top, window], dim=-1))
    return out
