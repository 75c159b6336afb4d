"""Adaptive search of layer-wise sparsity (and per-layer KV bits) with Optuna, then the model it ships.

The pieces, one module each: the space and its feasible-by-construction map (:mod:`lib.search_space`), what
trials prune from (:mod:`lib.oneshot`), the objective scored window by window (:mod:`lib.objective`),
samplers and pruners (:mod:`lib.samplers`), storage and study checks (:mod:`lib.study`), and the CSV and
plot (:mod:`lib.search_report`). This module runs the trials and ships the result.

Shipped = scored. The final model is pruned with exactly the procedure its trials were scored with
(``oneshot``: thresholding scores from dense activations; ``sequential``: Wanda-style recalibration, which
SparseGPT always uses), and the objective is measured again on it: the value equals the best trial's. With
``reprune_top K`` (oneshot trials) the best K profiles are also pruned sequentially and scored on the same
objective; one is shipped only when it beats the best trial. The result records every value and which
model was shipped.

Selection on more windows (``select_top K``, EvoPress's last selection step): the K best distinct trials are
scored again, as their trials pruned them, on ``select_nsamples`` windows, and the best of them on those
windows is the one shipped (and re-pruned); the shipped value is then measured on the selection's windows and
equals that candidate's selection value. A few windows rank the best trials by noise as much as by quality.

Cost is counted in full-evaluation equivalents: a trial that the pruner stopped after ``w`` of ``n`` windows
costs ``w / n``; a trial that repeats an evaluated point reuses its value and costs nothing.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .models import decoder_layers
from .objective import Objective, Stopped
from .oneshot import DenseSnapshot, OneShotPruner, dense_input_stats
from .profile import Profile
from .prune import PruneResult, check_sparsity, prune_optspa, prune_sparsegpt, prune_wanda
from .samplers import coarse_popsize, make_pruner, make_sampler
from .search_report import plot_profile, trial_row, write_trials_csv
from .search_space import (Allocation, SearchConfig, SearchError, SearchSpace, module_shapes, profile_counts,
                           realized_profile, selection_nsamples)
from .sparsity import SparsityType
from .study import default_study_name, open_study, restart_study_name, scoring_fingerprint, storage_url

logger = logging.getLogger(__name__)


@dataclass
class SearchResult:
    profile: Profile
    study_name: str
    storage: str
    best_value: float
    best_trial: int
    trials: list[dict[str, Any]]
    seconds: float
    wasted_fraction: float
    cost_evals: float = 0.0  # full objective evaluations spent by the trials
    shipped: str | None = None  # "oneshot" or "sequential" (sparsity searches)
    shipped_value: float | None = None  # the objective measured on the shipped model
    shipped_trial: int | None = None  # the trial whose allocation ships
    shipped_restart: int = 0  # the restart (study) that trial belongs to
    restart_values: list[float | None] = field(default_factory=list)  # each restart's best trial value
    # trial number (with restarts "restart/number") -> sequential re-prune value, value on the selection
    reprune_values: dict[int | str, float] = field(default_factory=dict)
    selection_values: dict[int | str, float] = field(default_factory=dict)
    selection_windows: int | None = None  # windows of the selection objective (None: no selection)
    selection_evals: float = 0.0  # the selection's cost, in full evaluations of the trials' objective
    memory: dict[str, float] = field(default_factory=dict)
    prune: PruneResult | None = None  # masks and timings of the shipped pruning
    files: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        states = [r["state"] for r in self.trials]
        return {"best_value": self.best_value, "best_trial": self.best_trial, "shipped": self.shipped,
                "shipped_value": self.shipped_value, "shipped_trial": self.shipped_trial,
                "shipped_restart": self.shipped_restart, "restart_values": self.restart_values,
                "reprune_values": {str(k): v for k, v in self.reprune_values.items()},
                "selection_values": {str(k): v for k, v in self.selection_values.items()},
                "selection_windows": self.selection_windows, "selection_evals": self.selection_evals,
                "seconds": self.seconds, "wasted_fraction": self.wasted_fraction, "cost_evals": self.cost_evals,
                "complete_trials": states.count("COMPLETE"), "pruned_trials": states.count("PRUNED"),
                "memory": self.memory}


def prune_sequential(method: str, model: nn.Module, calib: list[torch.Tensor], profile: Profile, device,
                     offload: bool, blocksize: int = 128, percdamp: float = 0.01) -> PruneResult:
    """Wanda's layer-by-layer scheme with ``method``'s collector (unstructured)."""
    pattern = SparsityType()
    if method == "wanda":
        return prune_wanda(model, calib, profile, pattern, device, offload)
    if method == "optspa":
        return prune_optspa(model, calib, profile, pattern, device, offload)
    if method == "sparsegpt":
        return prune_sparsegpt(model, calib, profile, pattern, device, offload, blocksize, percdamp)
    raise SearchError(f"cannot search sparsity for method {method!r}")


@dataclass
class _Restart:
    """One independent search of a run: its study, its space (trend_layer's center is per study) and what it
    finished with."""
    index: int
    name: str
    study: Any
    space: SearchSpace
    complete: list
    cost: float


class TrialRunner:
    """Everything a trial needs, prepared once (objective windows first, while the model is dense; then the
    oneshot orders or the dense snapshot): :meth:`apply` prunes one allocation, :meth:`score` scores it."""

    def __init__(self, model: nn.Module, cfg: SearchConfig, space: SearchSpace, calib: list[torch.Tensor] | None,
                 objective: Objective, device, offload: bool, kv_kwargs: dict[str, Any] | None = None,
                 trial_kv=None):
        self.model, self.cfg, self.space, self.calib = model, cfg, space, calib
        self.device, self.offload, self.objective = device, offload, objective
        self.kv_kwargs = dict(kv_kwargs or {})
        self.trial_kv = trial_kv  # fixed KV quantization of a sparsity search (the final evaluation's)
        self.shapes = space.shapes
        self.snapshot = self.oneshot = None
        if cfg.searches_sparsity:
            zeros = check_sparsity(model)[0]
            if zeros > 0.01:  # trials restore to these weights and score them as if they were dense
                logger.warning("the model's decoder linears are already %.1f%% zeros: the sparsity search prunes "
                               "these weights as if they were dense", 100 * zeros)
            # On the host: sequential trials and re-prunes start here, oneshot trials take dense values back.
            self.snapshot = DenseSnapshot(model)
            if cfg.trial_mode == "oneshot":
                t0 = time.perf_counter()
                stats = dense_input_stats(model, calib, device, offload)
                self.oneshot = OneShotPruner(model, stats, cfg.method, space.count_bounds(), device, self.snapshot)
                logger.info("oneshot %s scores from dense activations in %.1f s", cfg.method,
                            time.perf_counter() - t0)

    def memory(self) -> dict[str, float]:
        """Bytes the search holds besides the model, and the ratio to the model's decoder linears."""
        linears = sum(m.weight.numel() * m.weight.element_size()
                      for layer in decoder_layers(self.model) for m in layer.modules() if isinstance(m, nn.Linear))
        band = self.oneshot.nbytes() if self.oneshot is not None else 0
        snap = self.snapshot.nbytes() if self.snapshot is not None else 0
        return {"decoder_linear_bytes": linears, "oneshot_band_bytes": band, "host_snapshot_bytes": snap,
                "band_ratio": band / linears if linears else 0.0, "total_ratio": (band + snap) / linears}

    def kv_config(self, alloc: Allocation):
        if alloc.key_bits is None:
            return self.trial_kv
        from .kvquant import KVQuantConfig

        return KVQuantConfig(key_bits=list(alloc.key_bits), value_bits=list(alloc.value_bits), **self.kv_kwargs)

    def apply(self, alloc: Allocation) -> tuple[Profile, PruneResult | None]:
        """Prune the model under ``alloc`` as trials do (no-op for KV-only searches)."""
        if not self.cfg.searches_sparsity:
            return Profile(num_layers=self.space.num_layers), None
        prof = realized_profile(self.model, alloc.unit_ratio, self.cfg.target)
        if self.oneshot is not None:
            self.oneshot.apply(profile_counts(prof, self.shapes))
            return prof, None
        return prof, self.reprune(prof)

    def reprune(self, prof: Profile) -> PruneResult:
        """Sequential pruning of ``prof`` from the dense snapshot."""
        self.snapshot.restore()  # the oneshot bands are stale now: rebuild() before their next apply()
        return prune_sequential(self.cfg.method, self.model, self.calib, prof, self.device, self.offload,
                                self.cfg.blocksize, self.cfg.percdamp)

    def restore_masks(self, res: PruneResult) -> None:
        """The model of an earlier (Wanda-style, weight-preserving) re-prune: dense weights, then its masks."""
        from .masks import apply_masks, unpack

        self.snapshot.restore()
        apply_masks(self.model, {n: unpack(m, res.shapes[n]) for n, m in res.masks.items()}, list(res.masks))

    def score(self, alloc: Allocation, report=None, should_stop=None, objective: Objective | None = None) -> float:
        from .kvquant import simulate_kv_quant

        with simulate_kv_quant(self.model, self.kv_config(alloc)):
            return (objective or self.objective)(report, should_stop)


def _allocation_of(space: SearchSpace, t) -> Allocation:
    ua = t.user_attrs
    kv = None
    if ua.get("key_bits") is not None:
        kv = list(ua["key_bits"]) + (list(ua["value_bits"]) if space.cfg.kv_separate else [])
    return space.allocation(ua.get("levels"), kv)


def run_search(model: nn.Module, cfg: SearchConfig, *, calib: list[torch.Tensor] | None,
               objective_ids: torch.Tensor, seqlen: int, objective_nsamples: int = 64,
               device: str | torch.device = "cpu", offload: bool = False, model_name: str = "",
               base_profile: Profile | None = None, kv_kwargs: dict[str, Any] | None = None, trial_kv=None,
               selection_ids: torch.Tensor | list | None = None, progress: bool = True) -> SearchResult:
    """Run (or resume) the study and ship its best allocation: after a sparsity search the model is pruned
    as shipped (``result.prune`` holds the masks); a KV-only search leaves the weights as they came.
    Completed trials are never redone: the study counts them in its storage. ``selection_ids``: the text of
    the selection on more windows (``cfg.select_top``), when ``objective_ids`` does not hold enough windows."""
    import optuna

    cfg.check()
    if cfg.sampler in ("gp", "cmaes") and cfg.pruner != "none":
        logger.warning("--sampler %s learns from complete trials only: the trials the %s pruner stops teach it "
                       "nothing (--pruner auto searches without one)", cfg.sampler, cfg.pruner)
    start = time.perf_counter()
    num_layers = len(decoder_layers(model))
    shapes = module_shapes(model)
    if cfg.searches_sparsity and cfg.granularity in ("block", "block_module") and \
            not 1 <= cfg.num_blocks <= num_layers:
        raise SearchError(f"--num_blocks {cfg.num_blocks} must be between 1 and the number of layers ({num_layers})")
    SearchSpace(cfg, shapes, num_layers)  # refuses an impossible space before any work; each restart has its own
    url = storage_url(cfg)
    name = cfg.study_name or default_study_name(cfg, model_name)
    objective = Objective(model, objective_ids, seqlen, objective_nsamples, device, offload, cfg.objective,
                          cfg.batch_size, workdir=cfg.save_dir)
    nwin = objective.nwin
    selector = None
    if cfg.select_top > 0:  # built now, while the model is dense (kl keeps the dense distribution)
        selector = Objective(model, objective_ids if selection_ids is None else selection_ids, seqlen,
                             selection_nsamples(cfg.select_nsamples, objective_nsamples), device, offload,
                             cfg.objective, cfg.batch_size, workdir=cfg.save_dir)
    bounds: dict = {}  # what level switches may move; updated in place when trend_layer refines
    coarse = cfg.coarse_sampler if cfg.searches_sparsity and cfg.granularity == "trend_layer" else None
    scoring = scoring_fingerprint(model, objective_ids, seqlen, objective_nsamples, calib, kv_kwargs,
                                  None if trial_kv is None else trial_kv.to_dict())
    finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    runner: TrialRunner | None = None
    memory: dict[str, float] = {}

    def search_restart(i: int) -> _Restart:
        """Restart ``i``: its own study (``-restart{i}`` after the name from the second on), space and sampler
        seeded ``seed + i``, run (or resumed) to its trials or budget; the runner is shared."""
        nonlocal runner
        rname, seed = restart_study_name(name, i), cfg.seed + i
        space = SearchSpace(cfg, shapes, num_layers)
        bounds.clear()
        bounds.update(space.search_bounds())

        def repair_key(params: dict[str, Any]) -> str:
            levels = space.raw_levels(params) if cfg.searches_sparsity else None
            kv_names = space.kv_param_names() if cfg.searches_kv else []
            if (cfg.searches_sparsity and levels is None) or any(n not in params for n in kv_names):
                return ""  # a partial sample: no point to compare yet
            kv = [params[n] for n in kv_names]
            return space.allocation(levels, space.kv_from_priorities(kv) if kv else None).key()

        sampler = make_sampler(cfg.sampler, seed, space.uniform_params(), bounds, repair_key, coarse,
                               coarse_popsize(cfg.coarse_evals, len(space.trend_param_names())) if coarse else None,
                               cfg.startup_scale)
        study = open_study(cfg, rname, url, space.fingerprint(), scoring, model_name, sampler,
                           make_pruner(cfg.pruner, nwin, cfg.coarse_pruner if coarse else None))

        def trials(states=finished_states):
            return study.get_trials(deepcopy=False, states=states)

        def cost() -> float:
            return sum((t.user_attrs.get("windows") or 0) for t in trials()) / nwin

        done = len(trials())

        def use_center(levels: list[int]) -> None:
            space.set_center(levels)
            bounds.clear()
            bounds.update(space.search_bounds())

        def refine_stage() -> None:
            """trend_layer: once the trend's share is spent, fix the center (the best trend so far) in the study,
            so every worker and every resume refines around the same levels."""
            if cfg.granularity != "trend_layer" or not cfg.searches_sparsity or space.center is not None:
                return
            stored = study.user_attrs.get("refine_center")  # set by an earlier run or another worker
            if stored is None:
                spent = cost() / cfg.budget_evals if cfg.budget_evals is not None else len(trials()) / cfg.n_trials
                if spent < cfg.coarse_fraction:
                    return
                coarse = [t for t in trials((optuna.trial.TrialState.COMPLETE,)) if space.is_trend_trial(t.params)]
                if not coarse:
                    return
                best_coarse = min(coarse, key=lambda t: (t.value, t.number))
                stored = list(best_coarse.user_attrs["levels"])
                study.set_user_attr("refine_center", stored)
                study.set_user_attr("refine_center_trial", best_coarse.number)
                logger.info("trend_layer: refining every layer around trial %d (%s %.4f)", best_coarse.number,
                            cfg.objective, best_coarse.value)
            use_center(stored)

        refine_stage()  # a resumed study refines where it left off
        units = ""
        if cfg.searches_sparsity:
            units = f"; {cfg.granularity} units within {cfg.target:g} +- {cfg.sparsity_range:g}"
            if cfg.granularity == "trend_layer":
                units += f", the trend for {cfg.coarse_fraction:g} of the evaluations"
        logger.info("study '%s' (%s): %d of %d trials finished; %s sampler (seed %d), %s pruner, objective %s on "
                    "%d windows of %d%s", rname, url.split("@")[-1], done, cfg.n_trials,
                    cfg.sampler + (f" (trend stage: {coarse})" if coarse and coarse != cfg.sampler else ""), seed,
                    cfg.pruner + (f" (trend stage: {cfg.coarse_pruner})"
                                  if coarse and cfg.coarse_pruner != cfg.pruner else ""),
                    cfg.objective, nwin, seqlen, units)
        if runner is None:  # prepared once, for every restart
            runner = TrialRunner(model, cfg, space, calib, objective, device, offload, kv_kwargs, trial_kv)
            memory.update(runner.memory())
            logger.info("the search holds %.1f MiB besides the model: oneshot band %.2fx and host snapshot %.2fx "
                        "the decoder linears", (memory["oneshot_band_bytes"] + memory["host_snapshot_bytes"]) / 2**20,
                        memory["band_ratio"], memory["total_ratio"] - memory["band_ratio"])

        def objective_fn(trial) -> float:
            refine_stage()
            alloc = space.suggest(trial)
            key = alloc.key()
            trial.set_user_attr("key", key)
            trial.set_user_attr("levels", alloc.levels)
            trial.set_user_attr("key_bits", alloc.key_bits)
            trial.set_user_attr("value_bits", alloc.value_bits)
            dup = next((t for t in trials((optuna.trial.TrialState.COMPLETE,)) if t.user_attrs.get("key") == key),
                       None)
            if dup is not None:  # an evaluated point: reuse its value, spend nothing
                for k in ("mean_sparsity", "realized_sparsity", "kv_avg_bits", "feasible", "layer_sparsity",
                          "module_sparsity"):
                    trial.set_user_attr(k, dup.user_attrs.get(k))
                trial.set_user_attr("duplicate_of", dup.number)
                trial.set_user_attr("windows", 0)
                return dup.value
            t0 = time.perf_counter()
            prof, _ = runner.apply(alloc)
            t1 = time.perf_counter()
            mean = space.mean_sparsity(alloc) if cfg.searches_sparsity else None
            realized = prof.meta.get("realized_sparsity")
            bits = (alloc.key_bits or []) + (alloc.value_bits or [])
            kv_avg = sum(bits) / len(bits) if alloc.key_bits else None
            feasible = ((mean is None or abs(mean - cfg.target) <= 1e-6)
                        and (realized is None or abs(realized - cfg.target) <= 1e-3)
                        and (kv_avg is None or kv_avg <= space.kv_budget + 1e-9))
            for k, v in {"mean_sparsity": mean, "realized_sparsity": realized, "kv_avg_bits": kv_avg,
                         "feasible": feasible, "layer_sparsity": prof.sparsity,
                         "module_sparsity": {str(k): v for k, v in prof.module_sparsity.items()} or None}.items():
                trial.set_user_attr(k, v)
            if not feasible:  # cannot happen by construction; loud if it ever does
                logger.error("trial %d misses the budget: mean %s realized %s kv %s", trial.number, mean, realized,
                             kv_avg)
            trend_stage = cfg.granularity == "trend_layer" and space.is_trend_trial(trial.params)
            rule = cfg.coarse_pruner if trend_stage else cfg.pruner
            trial.set_user_attr("pruner", rule)  # the stopping rule this trial was judged by (stages may differ)
            should_stop = None if rule == "none" else trial.should_prune
            try:
                value = runner.score(alloc, lambda step, v: trial.report(v, step), should_stop)
            except Stopped as stop:
                trial.set_user_attr("windows", stop.windows)
                trial.set_user_attr("trial_seconds", time.perf_counter() - t0)
                logger.info("trial %d stopped by the pruner after %d of %d windows", trial.number, stop.windows,
                            nwin)
                raise optuna.TrialPruned() from None
            t2 = time.perf_counter()
            for k, v in {"windows": nwin, "apply_seconds": t1 - t0, "eval_seconds": t2 - t1,
                         "trial_seconds": t2 - t0}.items():
                trial.set_user_attr(k, v)
            logger.info("trial %d: %s %.4f (sparsity %s, kv avg %s) in %.2f s", trial.number, cfg.objective, value,
                        f"{realized:.4f}" if realized is not None else "-",
                        f"{kv_avg:.2f}" if kv_avg is not None else "-", t2 - t0)
            return value

        if done < cfg.n_trials and (cfg.budget_evals is None or cost() < cfg.budget_evals):
            desc = f"search {cfg.kind}" + (f" {i + 1}/{cfg.restarts}" if cfg.restarts > 1 else "")
            bar = tqdm(total=cfg.n_trials, initial=done, desc=desc, disable=not progress)

            def on_trial(study_, _trial) -> None:
                refine_stage()  # before the next trial is created: its sampler follows the stage
                bar.n = len(trials())
                try:
                    bar.set_postfix(best=f"{study_.best_value:.4f}", cost=f"{cost():.1f}", refresh=False)
                except ValueError:
                    pass
                bar.refresh()
                if cfg.budget_evals is not None and cost() >= cfg.budget_evals:
                    study_.stop()

            try:
                study.optimize(objective_fn, n_trials=cfg.n_trials - done, gc_after_trial=False,
                               callbacks=[optuna.study.MaxTrialsCallback(cfg.n_trials, states=finished_states),
                                          on_trial])
            finally:
                bar.close()

        return _Restart(i, rname, study, space, list(trials((optuna.trial.TrialState.COMPLETE,))), cost())

    restarts = [search_restart(i) for i in range(cfg.restarts)]
    complete = [t for r in restarts for t in r.complete]
    if not complete:
        objective.close()
        if selector is not None:
            selector.close()
        raise SearchError(f"study '{name}' has no completed trial")
    best_restart, best = min(((r, t) for r in restarts for t in r.complete),
                             key=lambda p: (p[1].value, p[0].index, p[1].number))
    result = SearchResult(profile=Profile(num_layers=num_layers), study_name=best_restart.name, storage=url,
                          best_value=best.value, best_trial=best.number, trials=[], seconds=0.0,
                          wasted_fraction=0.0, cost_evals=sum(r.cost for r in restarts), memory=memory)
    try:
        _ship(result, runner, best_restart.space, [r.complete for r in restarts], selector, nwin, progress)
    finally:
        objective.close()
        if selector is not None:
            selector.close()
    # the profile is the shipped model's: a re-prune of another of the best trials (or restarts) may have won
    won = restarts[result.shipped_restart]
    result.study_name = won.name
    shipped = next(t for t in won.complete if t.number == result.shipped_trial)
    result.profile = _profile_from_trial(shipped, num_layers, cfg, base_profile, model_name, won.name, url)
    rows = [({"restart": r.index} if cfg.restarts > 1 else {}) | trial_row(t)
            for r in restarts for t in r.study.get_trials(deepcopy=False)]
    result.trials = rows
    result.restart_values = [min((t.value for t in r.complete), default=None) for r in restarts]
    result.wasted_fraction = sum(1 for r in rows if r["state"] == "COMPLETE" and r["feasible"] is False) / len(complete)
    per_trial = [t.user_attrs.get("trial_seconds") for t in complete if t.user_attrs.get("trial_seconds")]
    result.profile.meta.update({
        "best_trial": best.number, "best_value": best.value, "shipped": result.shipped,
        "shipped_trial": result.shipped_trial,
        "shipped_value": result.shipped_value, "reprune_values": result.summary()["reprune_values"],
        "selection_values": result.summary()["selection_values"], "selection_windows": result.selection_windows,
        "selection_evals": result.selection_evals, "n_trials": len(rows), "complete_trials": len(complete),
        "cost_evals": result.cost_evals,
        "wasted_fraction": result.wasted_fraction,
        "mean_trial_seconds": sum(per_trial) / len(per_trial) if per_trial else None})
    if cfg.restarts > 1:
        result.profile.meta.update({"seed": cfg.seed + won.index, "restarts": cfg.restarts,
                                    "shipped_restart": won.index, "best_restart": best_restart.index,
                                    "restart_values": result.restart_values})
    result.seconds = time.perf_counter() - start
    if cfg.save_dir:
        os.makedirs(cfg.save_dir, exist_ok=True)
        result.files["trials"] = f"{cfg.save_dir}/trials_{cfg.kind}_s{cfg.target:.2f}.csv"
        write_trials_csv(result.files["trials"], rows)
        result.files["plot"] = f"{cfg.save_dir}/profile_{cfg.kind}_s{cfg.target:.2f}.png"
        plot_profile(result.files["plot"], result.profile, f"{name}: best {cfg.objective} {best.value:.4g}")
    logger.info("search done: best trial %d, %s %.4f; shipped trial %d%s, %s model scores %.4f%s; %d trials "
                "(%d complete), %.1f full evaluations (+%.1f selecting), %.1f s", best.number, cfg.objective,
                best.value, result.shipped_trial,
                f" of restart {won.index} (seed {cfg.seed + won.index})" if cfg.restarts > 1 else "",
                result.shipped or "-",
                result.shipped_value if result.shipped_value is not None else float("nan"),
                f" on {result.selection_windows} selection windows" if result.selection_windows else "", len(rows),
                len(complete), result.cost_evals, result.selection_evals, result.seconds)
    return result


def _distinct(groups: list[list]) -> list[tuple[int, Any]]:
    """Completed trials of every restart, best first, as (restart, trial), one per evaluated point (duplicates
    reuse a value and add nothing; every restart's trial 0 is the same uniform point)."""
    seen, out = set(), []
    pooled = [(i, t) for i, group in enumerate(groups) for t in group]
    for i, t in sorted(pooled, key=lambda p: (p[1].value, p[0], p[1].number)):
        if t.user_attrs.get("key") not in seen:
            seen.add(t.user_attrs.get("key"))
            out.append((i, t))
    return out


def _ship(result: SearchResult, runner: TrialRunner, space: SearchSpace, groups: list[list],
          selector: Objective | None, nwin: int, progress: bool) -> None:
    """Prune the best allocation exactly as its trial was, measure the objective on that model, and try the
    sequential re-prunes (kept only when they win). With a selector, "best" is the best of the top trials on
    the selection's windows, and every value compared from there on is measured on those windows. ``groups``:
    each restart's completed trials; without a selector each restart's best ``reprune_top`` are re-pruned, so
    the restart whose shipped model scores best ships."""
    cfg = runner.cfg
    ranked = _distinct(groups)
    judge = runner.objective

    def label(i: int, t) -> int | str:
        return t.number if len(groups) == 1 else f"{i}/{t.number}"

    if selector is not None:
        for i, t in tqdm(ranked[: cfg.select_top], desc="select", disable=not progress):
            cand = _allocation_of(space, t)
            runner.apply(cand)
            result.selection_values[label(i, t)] = runner.score(cand, objective=selector)
            logger.info("selection: trial %s scores %s %.4f on %d windows (its trial %.4f on %d)", label(i, t),
                        cfg.objective, result.selection_values[label(i, t)], selector.nwin, t.value, nwin)
        ranked = sorted(ranked[: cfg.select_top],
                        key=lambda p: (result.selection_values[label(*p)], p[0], p[1].number))
        result.selection_windows = selector.nwin
        result.selection_evals = len(result.selection_values) * selector.nwin / nwin
        judge = selector
    best_restart, best = ranked[0]
    alloc = _allocation_of(space, best)
    prof, seq = runner.apply(alloc)
    result.shipped_value, result.shipped_trial = runner.score(alloc, objective=judge), best.number
    result.shipped_restart = best_restart
    scored = result.selection_values.get(label(best_restart, best), best.value)
    if result.shipped_value != scored:
        logger.warning("the shipped model scores %.6f, its trial %.6f: the study's trials were scored "
                       "elsewhere (another machine or library version)", result.shipped_value, scored)
    if not cfg.searches_sparsity:
        return
    result.shipped = cfg.trial_mode
    result.prune = runner.oneshot.masks() if runner.oneshot is not None else seq
    if runner.oneshot is None or cfg.reprune_top <= 0:
        return
    if selector is not None:
        candidates = ranked[: cfg.reprune_top]
    else:  # each restart's own best, as if each had shipped on its own
        candidates, taken = [], [0] * len(groups)
        for p in ranked:
            if taken[p[0]] < cfg.reprune_top:
                candidates.append(p)
                taken[p[0]] += 1
    winner = None
    for p in candidates:
        i, t = p
        cand = _allocation_of(space, t)
        cand_prof = realized_profile(runner.model, cand.unit_ratio, cfg.target)
        res = runner.reprune(cand_prof)
        value = runner.score(cand, objective=judge)
        result.reprune_values[label(i, t)] = value
        logger.info("sequential re-prune of trial %s: %s %.4f (its oneshot model %.4f)", label(i, t),
                    cfg.objective, value, result.selection_values.get(label(i, t), t.value))
        if value < result.shipped_value:
            winner, result.shipped_value, result.prune = p, value, res
            result.shipped = "sequential"
    last = candidates[-1] if candidates else None
    if winner is None:  # back to the oneshot model of the best trial, exactly as scored
        runner.snapshot.restore()
        runner.oneshot.rebuild(profile_counts(prof, space.shapes))
    elif winner is not last:  # Wanda-style pruning only zeroes weights: dense x the winner's masks is its model
        runner.restore_masks(result.prune)
    if winner is not None:
        result.shipped_restart, result.shipped_trial = winner[0], winner[1].number


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
        prof.key_bits = list(ua["key_bits"])
        prof.value_bits = list(ua["value_bits"])
    prof.model, prof.method = model_name, cfg.method
    prof.meta.update({"study_name": study_name, "storage": url.split("@")[-1], "objective": cfg.objective,
                      "objective_value": t.value, "search": cfg.kind, "granularity": cfg.granularity,
                      "num_blocks": cfg.num_blocks, "trial_mode": cfg.trial_mode, "seed": cfg.seed,
                      "sampler": cfg.sampler, "pruner": cfg.pruner, "sparsity_range": cfg.sparsity_range,
                      "coarse_fraction": cfg.coarse_fraction if cfg.granularity == "trend_layer" else None,
                      "coarse_sampler": cfg.coarse_sampler if cfg.granularity == "trend_layer" else None,
                      "startup_scale": cfg.startup_scale if cfg.sampler == "tpe" else None,
                      "coarse_pruner": cfg.coarse_pruner if cfg.granularity == "trend_layer" else None,
                      "kv_avg_bits": (sum(prof.key_bits + prof.value_bits) / (2 * num_layers))
                      if prof.key_bits else None})
    return prof
