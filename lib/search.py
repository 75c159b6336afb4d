"""Adaptive search of layer-wise sparsity (and per-layer KV-cache bits) with Optuna's TPE sampler.

Search space
------------
Sparsity: the decoder linears are grouped into units (``block``: ``num_blocks`` contiguous layer blocks;
``layer``; ``module``: every linear of every layer). Each unit gets an integer offset ``k`` in
``[-K, K]`` (``K = range / step``), i.e. a ratio ``target + k * step`` on the grid.

KV bits: each layer gets a priority ``u`` in [0, 1]; ``u`` picks a wished-for level among the choices.

Feasibility by construction (no trial is rejected)
--------------------------------------------------
A raw sample is mapped deterministically onto the feasible set, and the mapped values are what is evaluated
and stored (trial user attributes); every feasible point is its own image, so nothing is out of reach.

* Sparsity: while the parameter-weighted offset sum ``E = sum_g w_g k_g`` is not zero, step the unit with the
  most extreme offset on the side of ``E`` one grid point towards the target (only moves that shrink ``|E|``);
  with equal units (blocks of equal size, layers) this ends at ``E = 0`` exactly, and any residual left by
  unequal units is spread over all units as a sub-grid shift. The parameter-weighted mean is then the target
  up to float rounding.
* Realized counts: pruning keeps ``int(cols * ratio)`` weights per row, so a grid ratio such as 0.525 of a
  192-wide row loses up to a row-step. :func:`realize` turns the nominal ratios into per-module row counts
  whose total is the target's count within half the smallest module's row count (on LLaMA-7B a few weights)
  and stores them as per-module overrides, so the pruned model, not only the profile, hits the target.
* KV bits: start from the wished-for levels; while the mean is over the budget, lower the layer of lowest
  priority that can go lower; while a raise still fits, raise the layer of highest priority. Every trial
  spends (at most) the budget.

Trial modes
-----------
``oneshot``: the Optspa scores are computed once from dense activations and each weight matrix's stable
per-row sort order is kept; a trial restores the dense weights and zeroes the first ``k`` entries per row
(exactly :func:`lib.sparsity.prune_mask` on those scores), then evaluates. ``sequential``: a trial restores the
dense weights and runs :func:`lib.prune.prune_optspa` (Wanda's layer-by-layer recalibration). Neither reloads
the model or re-tokenizes data.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .eval import eval_ppl, windows
from .io import atomic_path, write_text
from .layerwise import capture_layer_inputs
from .models import decoder_layers, find_linears
from .profile import Profile, block_layers
from .prune import InputStats, check_sparsity, collect_layer_inputs, prune_optspa
from .sparsity import SparsityType, optspa_score

logger = logging.getLogger(__name__)

SEARCH_KINDS = ("sparsity", "kv", "joint")
GRANULARITIES = ("block", "layer", "module")
TRIAL_MODES = ("oneshot", "sequential")
OBJECTIVES = ("ppl", "kl")


class SearchError(ValueError):
    """A search setting that cannot work (bad space, study mismatch); one line for the user."""


Unit = tuple[int, str]  # (decoder layer, module name)


# ----------------------------------------------------------------------------------------- config
@dataclass
class SearchConfig:
    target: float
    kind: str = "sparsity"
    granularity: str = "block"
    num_blocks: int = 8
    sparsity_range: float = 0.05
    sparsity_step: float = 0.025
    kv_bits_choices: tuple[int, ...] = (6, 8)
    kv_avg_bits: float | None = None  # None: the mean of the lowest and highest choice
    n_trials: int = 50
    seed: int = 0
    trial_mode: str = "oneshot"
    objective: str = "ppl"
    storage: str | None = None  # None: sqlite file in save_dir
    study_name: str | None = None
    save_dir: str | None = None
    batch_size: int = 1
    heartbeat_seconds: int = 60

    @property
    def searches_sparsity(self) -> bool:
        return self.kind in ("sparsity", "joint")

    @property
    def searches_kv(self) -> bool:
        return self.kind in ("kv", "joint")

    @property
    def kv_budget(self) -> float:
        choices = sorted(self.kv_bits_choices)
        return self.kv_avg_bits if self.kv_avg_bits is not None else (choices[0] + choices[-1]) / 2

    def check(self) -> None:
        """Raise :class:`SearchError` for settings that cannot work; needs no model."""
        if self.kind not in SEARCH_KINDS:
            raise SearchError(f"unknown search {self.kind!r} (choose from {', '.join(SEARCH_KINDS)})")
        if self.granularity not in GRANULARITIES:
            raise SearchError(f"unknown --search_granularity {self.granularity!r}")
        if self.trial_mode not in TRIAL_MODES:
            raise SearchError(f"unknown --trial_mode {self.trial_mode!r}")
        if self.objective not in OBJECTIVES:
            raise SearchError(f"unknown --objective {self.objective!r}")
        if self.n_trials < 1:
            raise SearchError("--n_trials must be at least 1")
        if self.searches_sparsity:
            if not 0 < self.sparsity_step <= 0.5:
                raise SearchError(f"--sparsity_step {self.sparsity_step} must be in (0, 0.5]")
            if not 0 <= self.sparsity_range < 1:
                raise SearchError(f"--sparsity_range {self.sparsity_range} must be in [0, 1)")
            if self.sparsity_range + 1e-9 < self.sparsity_step and self.sparsity_range > 0:
                raise SearchError(f"--sparsity_range {self.sparsity_range} is smaller than --sparsity_step "
                                  f"{self.sparsity_step}: the grid would hold the target only")
        if self.searches_kv:
            from .kvquant import SUPPORTED_BITS

            bad = sorted({b for b in self.kv_bits_choices if b not in SUPPORTED_BITS})
            if bad:
                raise SearchError(f"--kv_bits_choices {bad} not supported (choose from {list(SUPPORTED_BITS)})")
            if len(set(self.kv_bits_choices)) < 2:
                raise SearchError("--kv_bits_choices needs at least two different bit-widths to search")
            if not min(self.kv_bits_choices) <= self.kv_budget <= max(self.kv_bits_choices):
                raise SearchError(f"--kv_avg_bits {self.kv_budget:g} is outside the choices' range "
                                  f"[{min(self.kv_bits_choices)}, {max(self.kv_bits_choices)}]")


# ----------------------------------------------------------------------------------------- space
@dataclass
class Allocation:
    """One feasible point: per-unit sparsity ratios (nominal, on the grid) and per-layer KV bits."""

    unit_ratio: dict[Unit, float] = field(default_factory=dict)
    group_ratio: list[float] = field(default_factory=list)
    kv_bits: list[int] | None = None


def module_shapes(model: nn.Module) -> dict[Unit, tuple[int, int]]:
    """(rows, cols) of every prunable linear, by (layer, module name)."""
    return {(i, name): tuple(mod.weight.shape)
            for i, layer in enumerate(decoder_layers(model)) for name, mod in find_linears(layer).items()}


def make_groups(shapes: dict[Unit, tuple[int, int]], num_layers: int, granularity: str,
                num_blocks: int) -> tuple[list[str], list[list[Unit]]]:
    """Names and member modules of the searched units."""
    by_layer: dict[int, list[Unit]] = {}
    for unit in shapes:
        by_layer.setdefault(unit[0], []).append(unit)
    if granularity == "module":
        return [f"{i}-{n}" for i, n in shapes], [[u] for u in shapes]
    if granularity == "layer":
        return [f"layer{i}" for i in range(num_layers)], [by_layer[i] for i in range(num_layers)]
    blocks = block_layers(num_layers, num_blocks)
    return ([f"block{b}" for b in range(len(blocks))],
            [[u for i in layers for u in by_layer[i]] for layers in blocks])


class SearchSpace:
    """Maps Optuna's raw suggestions onto feasible allocations (see the module docstring)."""

    def __init__(self, cfg: SearchConfig, shapes: dict[Unit, tuple[int, int]], num_layers: int):
        self.cfg = cfg
        self.shapes = shapes
        self.num_layers = num_layers
        # A KV-only search has no sparsity units to group; per layer keeps the bookkeeping uniform.
        granularity = cfg.granularity if cfg.searches_sparsity else "layer"
        self.names, self.groups = make_groups(shapes, num_layers, granularity, cfg.num_blocks)
        self.weights = [sum(shapes[u][0] * shapes[u][1] for u in g) for g in self.groups]
        t, step = cfg.target, cfg.sparsity_step
        k = int(round(cfg.sparsity_range / step))
        # Offsets keep the ratio in [0, 1); near the edges the grid is one-sided.
        self.k_lo = max(-k, -int(math.floor(t / step + 1e-9)))
        self.k_hi = min(k, int(math.floor((0.999 - t) / step + 1e-9)))
        self.kv_choices = sorted(set(cfg.kv_bits_choices))
        self.kv_budget = cfg.kv_budget

    def fingerprint(self) -> str:
        """Identifies the space, so a resumed study with other settings is refused instead of mixed."""
        desc = {"kind": self.cfg.kind, "target": round(self.cfg.target, 6), "groups": self.names,
                "k": [self.k_lo, self.k_hi], "step": self.cfg.sparsity_step,
                "kv": [self.kv_choices, self.kv_budget] if self.cfg.searches_kv else None,
                "mode": self.cfg.trial_mode, "objective": self.cfg.objective}
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]

    # ------------------------------------------------------------ raw -> feasible
    def repair_offsets(self, raw: list[int]) -> tuple[list[int], float]:
        """Offsets with zero weighted sum where the grid allows it; returns them and the residual sum."""
        k = list(raw)
        excess = sum(w * o for w, o in zip(self.weights, k))
        while excess != 0:
            sign = 1 if excess > 0 else -1
            # Units that can step towards the target and whose step makes |excess| strictly smaller.
            cands = [g for g in range(len(k))
                     if (k[g] > self.k_lo if sign > 0 else k[g] < self.k_hi) and self.weights[g] < 2 * abs(excess)]
            if not cands:
                break
            g = max(cands, key=lambda i: (sign * k[i], self.weights[i], -i))
            k[g] -= sign
            excess -= sign * self.weights[g]
        return k, float(excess)

    def sparsity_from_offsets(self, raw: list[int]) -> tuple[list[float], list[int]]:
        k, residual = self.repair_offsets(raw)
        step = self.cfg.sparsity_step
        shift = [0.0] * len(k)
        if residual:  # unequal units only: a sub-grid shift on the units with room on that side
            room = [g for g in range(len(k)) if (k[g] > self.k_lo if residual > 0 else k[g] < self.k_hi)]
            per = residual * step / sum(self.weights[g] for g in room)
            for g in room:
                shift[g] = per
        return [self.cfg.target + o * step - sh for o, sh in zip(k, shift)], k

    def kv_from_priorities(self, prio: list[float]) -> list[int]:
        n = len(self.kv_choices)
        level = [min(int(p * n), n - 1) for p in prio]
        budget_total = self.kv_budget * len(level) + 1e-9

        def total() -> int:
            return sum(self.kv_choices[lv] for lv in level)

        order = sorted(range(len(prio)), key=lambda i: (prio[i], -i))  # lowest priority first
        while total() > budget_total:
            i = next(i for i in order if level[i] > 0)
            level[i] -= 1
        for i in reversed(order):  # highest priority first: spend what is left
            while level[i] < n - 1 and total() - self.kv_choices[level[i]] + self.kv_choices[level[i] + 1] <= budget_total:
                level[i] += 1
        return [self.kv_choices[lv] for lv in level]

    def allocation(self, offsets: list[int] | None, kv_bits: list[int] | None = None) -> Allocation:
        """The feasible allocation of grid offsets per group (raw or already repaired: repair is idempotent)."""
        alloc = Allocation(kv_bits=kv_bits)
        if offsets is not None:
            alloc.group_ratio, _ = self.sparsity_from_offsets(offsets)
        else:
            alloc.group_ratio = [self.cfg.target] * len(self.groups)
        for g, members in enumerate(self.groups):
            for u in members:
                alloc.unit_ratio[u] = alloc.group_ratio[g]
        return alloc

    def suggest(self, trial) -> Allocation:
        offsets = kv_bits = None
        if self.cfg.searches_sparsity:
            raw = [trial.suggest_int(f"s_{name}", self.k_lo, self.k_hi) for name in self.names]
            offsets = self.repair_offsets(raw)[0]
            trial.set_user_attr("offsets", offsets)
        if self.cfg.searches_kv:
            prio = [trial.suggest_float(f"kv_{i}", 0.0, 1.0) for i in range(self.num_layers)]
            kv_bits = self.kv_from_priorities(prio)
        return self.allocation(offsets, kv_bits)

    def uniform_params(self) -> dict[str, Any]:
        """Raw parameters of the uniform allocation (enqueued as trial 0, so the search never ends worse)."""
        params: dict[str, Any] = {}
        if self.cfg.searches_sparsity:
            params.update({f"s_{name}": 0 for name in self.names})
        if self.cfg.searches_kv:
            params.update({f"kv_{i}": 0.5 for i in range(self.num_layers)})
        return params

    def mean_sparsity(self, alloc: Allocation) -> float:
        total = sum(r * c for r, c in self.shapes.values())
        return sum(alloc.unit_ratio[u] * r * c for u, (r, c) in self.shapes.items()) / total


# ----------------------------------------------------------------------------------------- realization
def realize(shapes: dict[Unit, tuple[int, int]], ratios: dict[Unit, float], target: float) -> dict[Unit, int]:
    """Per-row pruned counts per module whose total equals ``target`` of all weights as closely as the row
    granularity allows, each within one row-step of its nominal ``cols * ratio`` (rounded)."""
    k = {u: int(round(shapes[u][1] * ratios[u])) for u in shapes}
    goal = int(round(target * sum(r * c for r, c in shapes.values())))
    deficit = goal - sum(shapes[u][0] * k[u] for u in shapes)
    order = sorted(shapes, key=lambda u: (-shapes[u][0], u))  # big steps first, fine ones last
    changed = True
    while deficit and changed:
        changed = False
        for u in order:
            rows, cols = shapes[u]
            step = 1 if deficit > 0 else -1
            new = k[u] + step
            if abs(deficit - step * rows) < abs(deficit) and 0 <= new < cols \
                    and abs(new - cols * ratios[u]) <= 1.0 + 1e-9:
                k[u] = new
                deficit -= step * rows
                changed = True
    return k


def count_ratio(k: int, cols: int) -> float:
    """A short ratio that ``int(cols * ratio)`` maps back to exactly ``k``."""
    for digits in (3, 4, 5, 6):
        r = round(k / cols, digits)
        if int(cols * r) == k:
            return r
    return round((k + 0.5) / cols, 6)  # mid-step: safe from float round-off


def realized_sparsity(shapes: dict[Unit, tuple[int, int]], counts: dict[Unit, int]) -> float:
    return sum(shapes[u][0] * counts[u] for u in shapes) / sum(r * c for r, c in shapes.values())


def realized_profile(model: nn.Module, ratios: dict[Unit, float], target: float, **kw) -> Profile:
    """A profile whose per-module overrides prune exactly the realized counts (see :func:`realize`)."""
    shapes = module_shapes(model)
    counts = realize(shapes, ratios, target)
    num_layers = len(decoder_layers(model))
    per_layer = []
    for i in range(num_layers):
        units = [u for u in shapes if u[0] == i]
        numel = sum(shapes[u][0] * shapes[u][1] for u in units)
        per_layer.append(round(sum(ratios[u] * shapes[u][0] * shapes[u][1] for u in units) / numel, 6))
    module: dict[int, dict[str, float]] = {}
    for (i, name), kk in counts.items():
        cols = shapes[(i, name)][1]
        nominal = ratios[(i, name)]
        if int(cols * per_layer[i]) == kk and abs(nominal - per_layer[i]) < 1e-9:
            continue  # the layer ratio already prunes this count: no override, a readable profile
        module.setdefault(i, {})[name] = count_ratio(kk, cols)
    prof = Profile(num_layers=num_layers, sparsity=per_layer, module_sparsity=module, target_sparsity=target, **kw)
    prof.meta["realized_sparsity"] = realized_sparsity(shapes, counts)
    return prof


# ----------------------------------------------------------------------------------------- dense state
class DenseSnapshot:
    """A CPU copy of every prunable weight, taken once; :meth:`restore` undoes any pruning in place."""

    def __init__(self, model: nn.Module):
        self.modules = {(i, n): m for i, layer in enumerate(decoder_layers(model)) for n, m in find_linears(layer).items()}
        self.weights = {u: m.weight.data.detach().to("cpu", copy=True) for u, m in self.modules.items()}

    @torch.no_grad()
    def restore(self) -> None:
        for u, m in self.modules.items():
            m.weight.data.copy_(self.weights[u].to(m.weight.device, non_blocking=True))


@torch.no_grad()
def dense_input_stats(model: nn.Module, calib: list[torch.Tensor], device: str | torch.device,
                      offload: bool = False) -> dict[Unit, torch.Tensor]:
    """Mean of x_j^2 over calibration tokens for every prunable linear, from the *dense* model, layer by
    layer through the shared capture path (used by oneshot trials and OWL)."""
    device = torch.device(device)
    inputs = capture_layer_inputs(model, calib, device)
    stats: dict[Unit, torch.Tensor] = {}
    for i, layer in enumerate(tqdm(decoder_layers(model), desc="dense stats", leave=False)):
        if offload:
            layer.to(device)
        collectors = {n: InputStats(m, optspa_score) for n, m in find_linears(layer).items()}
        # One pass: statistics and the dense outputs that feed the next layer.
        inputs.hidden = collect_layer_inputs(layer, inputs, device, collectors, keep=True)
        for n, c in collectors.items():
            stats[(i, n)] = c.mean_sq.cpu()
        if offload:
            layer.to("cpu")
    return stats


class OneShotPruner:
    """Optspa scores from dense activations, computed once; each call leaves the lowest ``k`` per row zeroed.

    Trials change only the difference from the previous trial (zero more of the order, or put dense values
    back), so a trial moves a few columns per row instead of copying the whole model from the snapshot; the
    weights come out identical to restoring and pruning from scratch."""

    def __init__(self, snapshot: DenseSnapshot, stats: dict[Unit, torch.Tensor]):
        self.snapshot = snapshot
        self.order: dict[Unit, torch.Tensor] = {}
        for u, w in snapshot.weights.items():
            score = optspa_score(w, stats[u])
            idx = torch.sort(score, dim=1, stable=True).indices  # the order prune_mask uses
            # int16 halves the memory of the order on LLaMA-size matrices (cols < 32768).
            self.order[u] = idx.to(torch.int16 if w.shape[1] < 32768 else torch.int32)
        self.pruned: dict[Unit, int] | None = None  # columns per row zeroed now; None: weights unknown

    def forget(self) -> None:
        """The weights were changed elsewhere (restored, re-pruned): the next apply starts from the snapshot."""
        self.pruned = None

    @torch.no_grad()
    def apply(self, ratios: dict[Unit, float]) -> None:
        if self.pruned is None:
            self.snapshot.restore()
            self.pruned = {u: 0 for u in self.snapshot.modules}
        for u, mod in self.snapshot.modules.items():
            k, was = int(mod.weight.shape[1] * ratios[u]), self.pruned[u]
            if k > was:
                idx = self.order[u][:, was:k].long()
                mod.weight.data.scatter_(1, idx.to(mod.weight.device), 0)
            elif k < was:
                idx = self.order[u][:, k:was].long()
                dense = self.snapshot.weights[u].gather(1, idx)
                mod.weight.data.scatter_(1, idx.to(mod.weight.device), dense.to(mod.weight.device))
            self.pruned[u] = k


# ----------------------------------------------------------------------------------------- objective
class Objective:
    """Perplexity of the objective windows, or KL divergence of the model's next-token distribution from the
    dense model's (dense log-probabilities kept in float16 on the CPU)."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, seqlen: int, nsamples: int, device, offload: bool,
                 kind: str = "ppl", batch_size: int = 1):
        self.model, self.seqlen, self.device, self.offload = model, seqlen, device, offload
        self.kind, self.batch_size = kind, batch_size
        self.nwin = min(nsamples, ids.numel() // seqlen)
        if self.nwin < 1:
            raise SearchError(f"objective text has {ids.numel()} tokens, fewer than one {seqlen}-token window")
        if self.nwin < nsamples:
            logger.warning("objective text holds %d windows of %d tokens; using %d, not %d",
                           self.nwin, seqlen, self.nwin, nsamples)
        self.ids = ids[:, : self.nwin * seqlen]
        self.dense_logp: list[torch.Tensor] | None = None
        if kind == "kl":
            if offload:
                raise SearchError("--objective kl needs the model on the device (use --offload off or ppl)")
            self.dense_logp = [lp.half().cpu() for lp in self._logps()]

    @torch.no_grad()
    def _logps(self) -> list[torch.Tensor]:
        out = []
        for w in windows(self.ids, self.seqlen, 1):
            logits = self.model(input_ids=w.to(self.device), use_cache=False).logits
            out.append(F.log_softmax(logits.float(), dim=-1)[0])
        return out

    @torch.no_grad()
    def __call__(self) -> float:
        if self.kind == "ppl":
            return eval_ppl(self.model, self.ids, self.seqlen, self.device, self.batch_size, self.offload,
                            desc="objective")
        total, count = 0.0, 0
        for dense, cur in zip(self.dense_logp, self._logps()):
            d = dense.to(cur.device).float()
            total += float((d.exp() * (d - cur)).sum())
            count += d.shape[0]
        return total / count


# ----------------------------------------------------------------------------------------- storage
def storage_url(cfg: SearchConfig) -> str:
    if cfg.storage:
        return cfg.storage
    if not cfg.save_dir:
        raise SearchError("the search needs --save (its study database lives there) or --storage")
    os.makedirs(cfg.save_dir, exist_ok=True)
    return "sqlite:///" + os.path.abspath(os.path.join(cfg.save_dir, "search.db"))


def open_storage(url: str, heartbeat_seconds: int = 60):
    """RDB URL (sqlite/postgresql/mysql, with heartbeats so a killed worker's trial is retried), or an Optuna
    journal file (``journal:PATH`` or a path ending in .log/.journal) for shared filesystems."""
    import optuna

    if url.startswith("journal:") or url.endswith((".log", ".journal")):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = url[len("journal:"):] if url.startswith("journal:") else url
        return JournalStorage(JournalFileBackend(path))
    for attempt in range(4):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and have been for years
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=heartbeat_seconds, grace_period=3 * heartbeat_seconds,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
                    engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
        except Exception as exc:  # sqlalchemy/driver errors: unreachable server, missing driver
            # Workers started together race to create the schema (table exists, duplicate alembic version):
            # the loser's retry finds it made. A missing driver will not appear by waiting.
            if "import" not in str(exc).lower() and attempt < 3:
                time.sleep(0.5 + attempt)
                continue
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "import" in first.lower() and url.startswith("postgresql"):
                first += ' (pip install "psycopg[binary]", or psycopg2-binary with a postgresql+psycopg2:// URL)'
            raise SearchError(f"cannot open study storage {url.split('@')[-1]}: {first}") from exc
    raise AssertionError("unreachable")


def scoring_fingerprint(model: nn.Module, objective_ids: torch.Tensor, seqlen: int, objective_nsamples: int,
                        calib: list[torch.Tensor] | None, kv_kwargs: dict[str, Any] | None) -> str:
    """What a trial's value depends on besides its parameters: the objective windows actually scored, the
    calibration windows, the KV quantizer settings and the weights' dtype. A study refuses trials scored
    on anything else, so a resumed or shared study never mixes values that are not comparable."""
    h = hashlib.sha256()
    nwin = max(0, min(objective_nsamples, objective_ids.numel() // seqlen))
    h.update(objective_ids[:, : nwin * seqlen].contiguous().cpu().numpy().tobytes())
    for window in calib or []:
        h.update(window.contiguous().cpu().numpy().tobytes())
    dtype = next(model.parameters()).dtype
    h.update(json.dumps({"seqlen": seqlen, "windows": nwin, "calib": len(calib or []), "kv": kv_kwargs or {},
                         "dtype": str(dtype)}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def default_study_name(cfg: SearchConfig, model_name: str) -> str:
    base = os.path.basename(os.path.normpath(model_name)) or model_name
    name = f"optspa-{base}-{cfg.kind}-{cfg.granularity}-s{cfg.target:.2f}"
    if cfg.searches_kv:
        name += f"-kv{cfg.kv_budget:g}"
    return name


# ----------------------------------------------------------------------------------------- search
@dataclass
class SearchResult:
    profile: Profile
    study_name: str
    storage: str
    best_value: float
    trials: list[dict[str, Any]]
    seconds: float
    wasted_fraction: float
    files: dict[str, str] = field(default_factory=dict)


class TrialRunner:
    """Everything a trial needs, prepared once: dense snapshot, calibration windows, oneshot orders,
    objective windows. :meth:`evaluate` applies one allocation and scores it."""

    def __init__(self, model: nn.Module, cfg: SearchConfig, calib: list[torch.Tensor] | None,
                 objective_ids: torch.Tensor, seqlen: int, objective_nsamples: int, device, offload: bool,
                 kv_kwargs: dict[str, Any] | None = None):
        self.model, self.cfg, self.calib, self.device, self.offload = model, cfg, calib, device, offload
        self.shapes = module_shapes(model)
        self.num_layers = len(decoder_layers(model))
        # The same KV settings as the final evaluation (main.py passes the --kv_* flags).
        self.kv_kwargs = dict(kv_kwargs or {})
        self.snapshot = self.oneshot = None
        if cfg.searches_sparsity:
            zeros = check_sparsity(model)[0]
            if zeros > 0.01:  # trials restore to these weights and score them as if they were dense
                logger.warning("the model's decoder linears are already %.1f%% zeros: the sparsity search prunes "
                               "these weights as if they were dense", 100 * zeros)
            self.snapshot = DenseSnapshot(model)
            if cfg.trial_mode == "oneshot":
                t0 = time.perf_counter()
                self.oneshot = OneShotPruner(self.snapshot, dense_input_stats(model, calib, device, offload))
                logger.info("oneshot scores from dense activations in %.1f s", time.perf_counter() - t0)
        self.objective = Objective(model, objective_ids, seqlen, objective_nsamples, device, offload,
                                   cfg.objective, cfg.batch_size)
        logger.info("objective: %s on %d windows of %d tokens", cfg.objective, self.objective.nwin, seqlen)

    def kv_config(self, bits: list[int] | None):
        if bits is None:
            return None
        from .kvquant import KVQuantConfig

        return KVQuantConfig(key_bits=list(bits), value_bits=list(bits), **self.kv_kwargs)

    def apply(self, alloc: Allocation) -> Profile:
        """Prune the model under ``alloc`` (no-op for KV-only searches); returns the realized profile."""
        if not self.cfg.searches_sparsity:
            return Profile(num_layers=self.num_layers)
        prof = realized_profile(self.model, alloc.unit_ratio, self.cfg.target)
        ratios = {u: prof.ratio(*u) for u in self.shapes}
        if self.oneshot is not None:
            self.oneshot.apply(ratios)
        else:
            self.snapshot.restore()
            prune_optspa(self.model, self.calib, prof, SparsityType(), self.device, self.offload)
        return prof

    def evaluate(self, alloc: Allocation) -> tuple[float, Profile, dict[str, float]]:
        t0 = time.perf_counter()
        prof = self.apply(alloc)
        t1 = time.perf_counter()
        from .kvquant import simulate_kv_quant

        with simulate_kv_quant(self.model, self.kv_config(alloc.kv_bits)):
            value = self.objective()
        t2 = time.perf_counter()
        return value, prof, {"apply_seconds": t1 - t0, "eval_seconds": t2 - t1, "trial_seconds": t2 - t0}

    def restore(self) -> None:
        if self.snapshot is not None:
            self.snapshot.restore()
        if self.oneshot is not None:
            self.oneshot.forget()


def _trial_row(space: SearchSpace, t) -> dict[str, Any]:
    ua = t.user_attrs
    return {"number": t.number, "state": t.state.name, "value": t.value,
            "trial_seconds": ua.get("trial_seconds"), "eval_seconds": ua.get("eval_seconds"),
            "mean_sparsity": ua.get("mean_sparsity"), "realized_sparsity": ua.get("realized_sparsity"),
            "kv_avg_bits": ua.get("kv_avg_bits"), "feasible": ua.get("feasible"),
            "layer_sparsity": ua.get("layer_sparsity"), "kv_bits": ua.get("kv_bits")}


def write_trials_csv(path: str, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    cols = list(rows[0]) if rows else ["number"]
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: (" ".join(f"{x:g}" for x in v) if isinstance(v, list) else v) for k, v in r.items()})
    write_text(path, buf.getvalue())


def plot_profile(path: str, profile: Profile, title: str) -> None:
    """Per-layer sparsity bars (target dashed) and, when present, KV bits per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(profile.num_layers))
    has_kv = profile.key_bits is not None
    fig, axes = plt.subplots(2 if has_kv else 1, 1, figsize=(max(6, 0.3 * len(layers) + 2), 5 if has_kv else 3),
                             sharex=True, squeeze=False)
    ax = axes[0][0]
    ax.bar(layers, profile.sparsity or [0] * len(layers), color="tab:blue")
    if profile.target_sparsity is not None:
        ax.axhline(profile.target_sparsity, color="k", ls="--", lw=1, label=f"target {profile.target_sparsity:g}")
        ax.legend(loc="upper right")
        spread = max(abs(s - profile.target_sparsity) for s in (profile.sparsity or [profile.target_sparsity]))
        ax.set_ylim(max(0, profile.target_sparsity - spread - 0.05), min(1, profile.target_sparsity + spread + 0.05))
    ax.set_ylabel("sparsity")
    ax.set_title(title)
    if has_kv:
        axes[1][0].bar(layers, profile.key_bits, color="tab:orange")
        axes[1][0].set_ylabel("KV bits")
    axes[-1][0].set_xlabel("decoder layer")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def run_search(model: nn.Module, cfg: SearchConfig, *, calib: list[torch.Tensor] | None,
               objective_ids: torch.Tensor, seqlen: int, objective_nsamples: int = 64,
               device: str | torch.device = "cpu", offload: bool = False, model_name: str = "",
               base_profile: Profile | None = None, kv_kwargs: dict[str, Any] | None = None,
               progress: bool = True) -> SearchResult:
    """Run (or resume) the study and return the best profile; the model is left dense (or, for a KV-only
    search, as it came). Completed trials are never redone: the study counts them in its storage."""
    import optuna

    cfg.check()
    start = time.perf_counter()
    num_layers = len(decoder_layers(model))
    shapes = module_shapes(model)
    if cfg.searches_sparsity and cfg.granularity == "block" and not 1 <= cfg.num_blocks <= num_layers:
        raise SearchError(f"--num_blocks {cfg.num_blocks} must be between 1 and the number of layers ({num_layers})")
    space = SearchSpace(cfg, shapes, num_layers)
    url = storage_url(cfg)
    name = cfg.study_name or default_study_name(cfg, model_name)
    storage = open_storage(url, cfg.heartbeat_seconds)
    with warnings.catch_warnings():  # multivariate TPE is "experimental" too; it models the coupled offsets
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own log line per trial says more
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, direction="minimize",
                                load_if_exists=True)
    fp = space.fingerprint()
    have = study.user_attrs.get("space")
    if have is not None and have != fp:
        raise SearchError(f"study '{name}' in {url.split('@')[-1]} was created with other search settings; "
                          "pass another --study_name")
    scoring = scoring_fingerprint(model, objective_ids, seqlen, objective_nsamples, calib, kv_kwargs)
    have_scoring = study.user_attrs.get("scoring")
    if have_scoring is not None and have_scoring != scoring:
        raise SearchError(f"study '{name}' in {url.split('@')[-1]} was scored on other data (objective windows, "
                          "calibration, KV settings or dtype); use the same flags or another --study_name")
    if have_scoring is None:
        if study.trials:
            logger.warning("study '%s' does not record what its trials were scored on; assuming the same data",
                           name)
        study.set_user_attr("scoring", scoring)
    if have is None:
        study.set_user_attr("space", fp)
        study.set_user_attr("target_sparsity", cfg.target)
        study.set_user_attr("model", model_name)
        study.set_user_attr("search", cfg.kind)
        if not study.trials:
            study.enqueue_trial(space.uniform_params(), user_attrs={"uniform": True})

    def done() -> int:
        return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))

    completed = done()
    logger.info("study '%s' (%s): %d of %d trials complete", name, url.split("@")[-1], completed, cfg.n_trials)
    runner = None
    if completed < cfg.n_trials:
        runner = TrialRunner(model, cfg, calib, objective_ids, seqlen, objective_nsamples, device, offload, kv_kwargs)

        def objective(trial) -> float:
            alloc = space.suggest(trial)
            value, prof, times = runner.evaluate(alloc)
            mean = space.mean_sparsity(alloc) if cfg.searches_sparsity else None
            realized = prof.meta.get("realized_sparsity")
            kv_avg = sum(alloc.kv_bits) / len(alloc.kv_bits) if alloc.kv_bits else None
            feasible = ((mean is None or abs(mean - cfg.target) <= 1e-3)
                        and (realized is None or abs(realized - cfg.target) <= 1e-3)
                        and (kv_avg is None or kv_avg <= space.kv_budget + 1e-9))
            for key, val in {**times, "mean_sparsity": mean, "realized_sparsity": realized, "kv_avg_bits": kv_avg,
                             "feasible": feasible, "layer_sparsity": prof.sparsity, "kv_bits": alloc.kv_bits,
                             "module_sparsity": {str(k): v for k, v in prof.module_sparsity.items()} or None}.items():
                trial.set_user_attr(key, val)
            if not feasible:  # cannot happen by construction; loud if it ever does
                logger.error("trial %d misses the budget: mean %s realized %s kv %s", trial.number, mean, realized, kv_avg)
            logger.info("trial %d: %s %.4f (sparsity %s, kv avg %s) in %.2f s", trial.number, cfg.objective, value,
                        f"{realized:.4f}" if realized is not None else "-",
                        f"{kv_avg:.2f}" if kv_avg is not None else "-", times["trial_seconds"])
            return value

        bar = tqdm(total=cfg.n_trials, initial=completed, desc=f"search {cfg.kind}", disable=not progress)

        def on_trial(study_, trial) -> None:
            bar.n = done()
            try:
                bar.set_postfix(best=f"{study_.best_value:.4f}", refresh=False)
            except ValueError:
                pass
            bar.refresh()

        try:
            study.optimize(objective, n_trials=cfg.n_trials - completed, gc_after_trial=False,
                           callbacks=[optuna.study.MaxTrialsCallback(cfg.n_trials), on_trial])
        finally:
            bar.close()
            runner.restore()

    trials = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not trials:
        raise SearchError(f"study '{name}' has no completed trial")
    best = min(trials, key=lambda t: t.value)
    profile = _profile_from_trial(best, num_layers, cfg, base_profile, model_name, name, url)
    rows = [_trial_row(space, t) for t in study.get_trials(deepcopy=False)]
    wasted = sum(1 for r in rows if r["state"] == "COMPLETE" and r["feasible"] is False) / max(len(trials), 1)
    per_trial = [t.user_attrs.get("trial_seconds") for t in trials if t.user_attrs.get("trial_seconds")]
    profile.meta.update({"best_trial": best.number, "n_trials": len(trials), "wasted_fraction": wasted,
                         "mean_trial_seconds": sum(per_trial) / len(per_trial) if per_trial else None})
    result = SearchResult(profile=profile, study_name=name, storage=url, best_value=best.value, trials=rows,
                          seconds=time.perf_counter() - start,
                          wasted_fraction=wasted)
    if cfg.save_dir:
        os.makedirs(cfg.save_dir, exist_ok=True)
        result.files["trials"] = os.path.join(cfg.save_dir, f"trials_{cfg.kind}_s{cfg.target:.2f}.csv")
        write_trials_csv(result.files["trials"], rows)
        result.files["plot"] = os.path.join(cfg.save_dir, f"profile_{cfg.kind}_s{cfg.target:.2f}.png")
        plot_profile(result.files["plot"], profile, f"{name}: best {cfg.objective} {best.value:.4g}")
    logger.info("search done: best trial %d, %s %.4f, %d trials, %.1f s, wasted fraction %.2f", best.number,
                cfg.objective, best.value, len(trials), result.seconds, wasted)
    return result


def _profile_from_trial(t, num_layers: int, cfg: SearchConfig, base: Profile | None, model_name: str,
                        study_name: str, url: str) -> Profile:
    ua = t.user_attrs
    if cfg.searches_sparsity:
        module = {int(k): dict(v) for k, v in (ua.get("module_sparsity") or {}).items()}
        prof = Profile(num_layers=num_layers, sparsity=list(ua["layer_sparsity"]), module_sparsity=module,
                       target_sparsity=cfg.target)
        prof.meta["realized_sparsity"] = ua.get("realized_sparsity")
    elif base is not None:
        prof = Profile.from_dict(base.to_dict())
    else:
        prof = Profile.uniform(num_layers, cfg.target)
    if cfg.searches_kv:
        prof.key_bits = list(ua["kv_bits"])
        prof.value_bits = list(ua["kv_bits"])
    prof.model, prof.method = model_name, "optspa"
    prof.meta.update({"study_name": study_name, "storage": url.split("@")[-1], "objective": cfg.objective,
                      "objective_value": t.value, "search": cfg.kind, "granularity": cfg.granularity,
                      "num_blocks": cfg.num_blocks, "trial_mode": cfg.trial_mode, "seed": cfg.seed,
                      "kv_avg_bits": (sum(prof.key_bits) / num_layers) if prof.key_bits else None})
    return prof
