"""Adaptive search of layer-wise sparsity (and per-layer KV bits) with Optuna, then the model it ships.

The pieces, one module each: the settings (:mod:`lib.search_config`), the space and its feasible-by-construction
map (:mod:`lib.search_space`), what trials prune from (:mod:`lib.oneshot`), the objective scored window by
window (:mod:`lib.objective`), samplers and pruners (:mod:`lib.samplers`), storage and study checks
(:mod:`lib.study`), and the CSV and plot (:mod:`lib.search_report`), the trials of one study
(:mod:`lib.trials`). This module runs the restarts' studies and ships the result.

Shipped = scored. The final model is pruned with exactly the procedure its trials were scored with
(``oneshot``: from dense activations, scores thresholded or SparseGPT's layer-wise passes; ``sequential``:
Wanda-style recalibration), and the objective is measured again on it: the value equals the best trial's. With
``reprune_top K`` (oneshot trials) the best K profiles are also pruned sequentially and scored on the same
objective; one is shipped only when it beats the best trial. The result records every value and which
model was shipped.

Selection on more windows (``select_top K``, EvoPress's last selection step): the K best distinct trials are
scored again, as their trials pruned them, on ``select_nsamples`` windows, and the best of them on those
windows is the one shipped (and re-pruned); the shipped value is then measured on the selection's windows and
equals that candidate's selection value. A few windows rank the best trials by noise as much as by quality.
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
from .objective import Objective
from .profile import Profile
from .prune import PruneResult
from .search_report import plot_profile, trial_row, write_trials_csv
from .search_config import SearchConfig, SearchError, selection_nsamples
from .search_space import Allocation, SearchSpace, module_shapes, profile_counts, realized_profile
from .study import default_study_name, restart_study_name, scoring_fingerprint, storage_url
from .trials import StudySearch, TrialRunner, allocation_of

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
    elite_values: dict[int | str, float] = field(default_factory=dict)  # elite-mean trial -> its value
    # the mean of the restarts' best allocations ("oneshot" / "sequential" -> value); shipped_trial is None
    # when it shipped
    restart_mean_values: dict[str, float] = field(default_factory=dict)
    selection_windows: int | None = None  # windows of the selection objective (None: no selection)
    selection_evals: float = 0.0  # the selection's cost, in full evaluations of the trials' objective
    # sequential re-prunes after the trials (the best's, the restarts', their mean's): wall time, and that time
    # in this run's full evaluations (its complete trials' mean seconds); not in cost_evals, which counts windows
    reprune_seconds: float = 0.0
    reprune_evals: float | None = None
    memory: dict[str, float] = field(default_factory=dict)
    prune: PruneResult | None = None  # masks and timings of the shipped pruning
    files: dict[str, str] = field(default_factory=dict)

    @property
    def shipped_mean(self) -> bool:
        """Whether the restarts' mean shipped (it has no trial, nor restart, of its own)."""
        return self.shipped_trial is None and bool(self.restart_mean_values)

    def summary(self) -> dict[str, Any]:
        states = [r["state"] for r in self.trials]
        return {"best_value": self.best_value, "best_trial": self.best_trial, "shipped": self.shipped,
                "shipped_value": self.shipped_value, "shipped_trial": self.shipped_trial,
                "shipped_restart": None if self.shipped_mean else self.shipped_restart,
                "restart_values": self.restart_values,
                "reprune_values": {str(k): v for k, v in self.reprune_values.items()},
                "selection_values": {str(k): v for k, v in self.selection_values.items()},
                "elite_values": {str(k): v for k, v in self.elite_values.items()},
                "restart_mean_values": dict(self.restart_mean_values),
                "selection_windows": self.selection_windows, "selection_evals": self.selection_evals,
                "reprune_seconds": self.reprune_seconds, "reprune_evals": self.reprune_evals,
                "seconds": self.seconds, "wasted_fraction": self.wasted_fraction, "cost_evals": self.cost_evals,
                "complete_trials": states.count("COMPLETE"), "pruned_trials": states.count("PRUNED"),
                "memory": self.memory}


def run_search(model: nn.Module, cfg: SearchConfig, *, calib: list[torch.Tensor] | None,
               objective_ids: torch.Tensor, seqlen: int, objective_nsamples: int = 64,
               device: str | torch.device = "cpu", offload: bool = False, model_name: str = "",
               base_profile: Profile | None = None, kv_kwargs: dict[str, Any] | None = None, trial_kv=None,
               selection_ids: torch.Tensor | list | None = None, progress: bool = True) -> SearchResult:
    """Run (or resume) the study and ship its best allocation: after a sparsity search the model is pruned
    as shipped (``result.prune`` holds the masks); a KV-only search leaves the weights as they came.
    Completed trials are never redone: the study counts them in its storage. ``selection_ids``: the text of
    the selection on more windows (``cfg.select_top``), when ``objective_ids`` does not hold enough windows."""
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
    scoring = scoring_fingerprint(model, objective_ids, seqlen, objective_nsamples, calib, kv_kwargs,
                                  None if trial_kv is None else trial_kv.to_dict())
    runner: TrialRunner | None = None
    memory: dict[str, float] = {}
    restarts: list[StudySearch] = []
    if cfg.restarts > 1:
        logger.info("%d restarts (sampler seeds %d to %d), each its own study, %s; the best shipped model ships "
                    "(--restarts 1: one search)", cfg.restarts, cfg.seed, cfg.seed + cfg.restarts - 1,
                    "then the mean of their best allocations" if cfg.restart_mean else "no mean of them")
    try:  # the objectives hold files (kl: the dense distribution on disk) until closed, whatever happens
        for i in range(cfg.restarts):  # each restart opens (and so checks) its study before its trials run
            study = StudySearch(cfg, i, restart_study_name(name, i), cfg.seed + i, url, model_name, shapes,
                                num_layers, scoring, nwin)
            logger.info("%s", study.describe(seqlen))
            if runner is None:  # prepared once, for every restart
                runner = TrialRunner(model, cfg, study.space, calib, objective, device, offload, kv_kwargs,
                                     trial_kv)
                memory.update(runner.memory())
                lin = memory["decoder_linear_bytes"]
                held = memory["total_ratio"] * lin / 2**20
                logger.info("the search holds %.1f MiB besides the model: oneshot band %.2fx, host snapshot %.2fx "
                            "and SparseGPT factors (host) %.2fx the decoder linears", held, memory["band_ratio"],
                            memory["host_snapshot_bytes"] / lin, memory["oneshot_host_bytes"] / lin)
            study.run(runner, progress)
            restarts.append(study)
        groups = [r.complete() for r in restarts]
        complete = [t for group in groups for t in group]
        if not complete:
            raise SearchError(f"study '{name}' has no completed trial")
        best_restart, best = min(((r, t) for r, group in zip(restarts, groups) for t in group),
                                 key=lambda p: (p[1].value, p[0].index, p[1].number))
        result = SearchResult(profile=Profile(num_layers=num_layers), study_name=best_restart.name, storage=url,
                              best_value=best.value, best_trial=best.number, trials=[], seconds=0.0,
                              wasted_fraction=0.0, cost_evals=sum(r.cost() for r in restarts), memory=memory)
        _ship(result, runner, best_restart.space, groups, selector, nwin, progress)
        mean_profile = None
        if cfg.restart_mean:
            mean_profile = _ship_restart_mean(result, runner, best_restart.space, groups,
                                              objective if selector is None else selector)
    finally:
        objective.close()
        if selector is not None:
            selector.close()
    # the profile is the shipped model's: a re-prune of another of the best trials (or restarts) may have won
    won = restarts[result.shipped_restart]
    result.study_name = won.name
    if mean_profile is not None:  # the restarts' mean: no trial of its own
        result.profile = _describe(mean_profile, result.shipped_value, cfg, model_name, won.name, url)
    else:
        shipped = next(t for t in groups[won.index] if t.number == result.shipped_trial)
        result.profile = _profile_from_trial(shipped, num_layers, cfg, base_profile, model_name, won.name, url)
    rows = [({"restart": r.index} if cfg.restarts > 1 else {}) | trial_row(t)
            for r in restarts for t in r.study.get_trials(deepcopy=False)]
    result.trials = rows
    result.restart_values = [min((t.value for t in group), default=None) for group in groups]
    result.elite_values = {(t.number if cfg.restarts == 1 else f"{r.index}/{t.number}"): t.value
                           for r, group in zip(restarts, groups) for t in group if "elite_mean" in t.user_attrs}
    result.wasted_fraction = sum(1 for r in rows if r["state"] == "COMPLETE" and r["feasible"] is False) / len(complete)
    per_trial = [t.user_attrs.get("trial_seconds") for t in complete if t.user_attrs.get("trial_seconds")]
    mean_trial = sum(per_trial) / len(per_trial) if per_trial else None
    if mean_trial and result.reprune_seconds:
        result.reprune_evals = result.reprune_seconds / mean_trial
    result.profile.meta.update({
        "best_trial": best.number, "best_value": best.value, "shipped": result.shipped,
        "shipped_trial": result.shipped_trial,
        "shipped_value": result.shipped_value, "reprune_values": result.summary()["reprune_values"],
        "selection_values": result.summary()["selection_values"], "selection_windows": result.selection_windows,
        "elite_values": result.summary()["elite_values"],
        "restart_mean_values": dict(result.restart_mean_values),
        "selection_evals": result.selection_evals, "n_trials": len(rows), "complete_trials": len(complete),
        "reprune_seconds": result.reprune_seconds, "reprune_evals": result.reprune_evals,
        "cost_evals": result.cost_evals,
        "wasted_fraction": result.wasted_fraction,
        "mean_trial_seconds": mean_trial})
    if cfg.restarts > 1:
        result.profile.meta.update({"seed": cfg.seed + won.index, "restarts": cfg.restarts,
                                    "shipped_restart": None if result.shipped_mean else won.index,
                                    "best_restart": best_restart.index,
                                    "restart_values": result.restart_values})
    result.seconds = time.perf_counter() - start
    if cfg.save_dir:
        os.makedirs(cfg.save_dir, exist_ok=True)
        result.files["trials"] = f"{cfg.save_dir}/trials_{cfg.kind}_s{cfg.target:.2f}.csv"
        write_trials_csv(result.files["trials"], rows)
        result.files["plot"] = f"{cfg.save_dir}/profile_{cfg.kind}_s{cfg.target:.2f}.png"
        plot_profile(result.files["plot"], result.profile, f"{name}: best {cfg.objective} {best.value:.4g}")
    logger.info("search done: best trial %d, %s %.4f; shipped %s%s, %s model scores %.4f%s; %d trials "
                "(%d complete), %.1f full evaluations (+%.1f selecting), re-prunes %.0f s, %.1f s",
                best.number, cfg.objective, best.value,
                "the restarts' mean" if result.shipped_mean else f"trial {result.shipped_trial}",
                "" if result.shipped_mean else
                f" of restart {won.index} (seed {cfg.seed + won.index})" if cfg.restarts > 1 else "",
                result.shipped or "-",
                result.shipped_value if result.shipped_value is not None else float("nan"),
                f" on {result.selection_windows} selection windows" if result.selection_windows else "", len(rows),
                len(complete), result.cost_evals, result.selection_evals, result.reprune_seconds, result.seconds)
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


def _sequential(result: SearchResult, prune, *args):
    """A sequential pruning after the trials (minutes each on a CPU), its wall time added to the result's."""
    t0 = time.perf_counter()
    out = prune(*args)
    result.reprune_seconds += time.perf_counter() - t0
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
            cand = allocation_of(space, t)
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
    alloc = allocation_of(space, best)
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
    winner = winner_prof = None
    for p in candidates:
        i, t = p
        cand = allocation_of(space, t)
        cand_prof = realized_profile(runner.model, cand.unit_ratio, cfg.target)
        res = _sequential(result, runner.reprune, cand_prof)
        value = runner.score(cand, objective=judge)
        result.reprune_values[label(i, t)] = value
        logger.info("sequential re-prune of trial %s: %s %.4f (its oneshot model %.4f)", label(i, t),
                    cfg.objective, value, result.selection_values.get(label(i, t), t.value))
        if value < result.shipped_value:
            winner, winner_prof, result.shipped_value, result.prune = p, cand_prof, value, res
            result.shipped = "sequential"
    last = candidates[-1] if candidates else None
    if winner is None:  # back to the oneshot model of the best trial, exactly as scored
        runner.snapshot.restore()
        runner.oneshot.rebuild(profile_counts(prof, space.shapes))
    elif winner is not last:  # a later re-prune lost: the winner's model again
        _sequential(result, runner.put_back, winner_prof, "sequential", result.prune)
    if winner is not None:
        result.shipped_restart, result.shipped_trial = winner[0], winner[1].number


def _ship_restart_mean(result: SearchResult, runner: TrialRunner, space: SearchSpace, groups: list[list],
                       judge: Objective) -> Profile | None:
    """Bagging the restarts: the mean of each restart's best allocation (per-module ratios, realized so the
    budget holds exactly), pruned oneshot and sequentially (as ``reprune_top`` allows re-prunes; sequential
    only for sequential trials) and scored on ``judge``. The best of these ships only when it beats the model
    shipped so far; else that model is put back. Returns the mean's profile when it ships."""
    cfg = runner.cfg
    bests = [min(group, key=lambda t: (t.value, t.number)) for group in groups if group]
    if len(bests) < 2:
        return None
    allocs = [allocation_of(space, t) for t in bests]
    mean = Allocation(unit_ratio={u: sum(a.unit_ratio[u] for a in allocs) / len(allocs) for u in space.shapes})
    prof = realized_profile(runner.model, mean.unit_ratio, cfg.target)
    counts = profile_counts(prof, space.shapes)
    before = result.prune  # the model shipped so far
    ways = (["oneshot"] if runner.oneshot is not None else []) + \
        (["sequential"] if runner.oneshot is None or cfg.reprune_top > 0 else [])
    won = None
    for how in ways:
        if how == "oneshot":
            runner.snapshot.restore()
            runner.oneshot.rebuild(counts)
            res = runner.oneshot.masks()
        else:
            res = _sequential(result, runner.reprune, prof)
        value = runner.score(mean, objective=judge)
        result.restart_mean_values[how] = value
        logger.info("the mean of the %d restarts' best allocations, pruned %s: %s %.4f (shipped so far %.4f)",
                    len(bests), how, cfg.objective, value, result.shipped_value)
        if value < result.shipped_value:
            won, result.shipped_value, result.prune, result.shipped = how, value, res, how
    if won is None:  # the model shipped before, exactly as scored
        best = next(t for t in groups[result.shipped_restart] if t.number == result.shipped_trial)
        shipped = realized_profile(runner.model, allocation_of(space, best).unit_ratio, cfg.target)
        _sequential(result, runner.put_back, shipped, result.shipped, before)
        return None
    if won != ways[-1]:  # a later way lost: the winner's model again
        _sequential(result, runner.put_back, prof, won, result.prune)
    result.shipped_trial = None
    return prof


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
    return _describe(prof, t.value, cfg, model_name, study_name, url)


def _describe(prof: Profile, value: float, cfg: SearchConfig, model_name: str, study_name: str, url: str) -> Profile:
    """The search's settings in the profile's meta (what made it, for anyone who reloads it)."""
    num_layers = prof.num_layers
    prof.model, prof.method = model_name, cfg.method
    prof.meta.update({"study_name": study_name, "storage": url.split("@")[-1], "objective": cfg.objective,
                      "objective_value": value, "search": cfg.kind, "granularity": cfg.granularity,
                      "num_blocks": cfg.num_blocks, "trial_mode": cfg.trial_mode, "seed": cfg.seed,
                      "trial_stats": cfg.trial_stats if cfg.trial_mode == "oneshot" else None,
                      "sampler": cfg.sampler, "pruner": cfg.pruner, "sparsity_range": cfg.sparsity_range,
                      "coarse_fraction": cfg.coarse_fraction if cfg.granularity == "trend_layer" else None,
                      "coarse_sampler": cfg.coarse_sampler if cfg.granularity == "trend_layer" else None,
                      "startup_scale": cfg.startup_scale if cfg.sampler == "tpe" else None,
                      "elite_mean": cfg.elite_mean, "restart_mean": cfg.restart_mean,
                      "coarse_pruner": cfg.coarse_pruner if cfg.granularity == "trend_layer" else None,
                      "kv_avg_bits": (sum(prof.key_bits + prof.value_bits) / (2 * num_layers))
                      if prof.key_bits else None})
    return prof
