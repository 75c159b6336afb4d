"""The trials of a search: what a trial prunes and scores (:class:`TrialRunner`, prepared once per run) and one
Optuna study run to its trials or budget (:class:`StudySearch`, one per restart).

Cost is counted in full-evaluation equivalents: a trial that the pruner stopped after ``w`` of ``n`` windows
costs ``w / n``; a trial that repeats an evaluated point reuses its value and costs nothing.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .models import decoder_layers
from .objective import Objective, Stopped
from .oneshot import SCORES, DenseSnapshot, oneshot_pruner
from .profile import Profile
from .prune import PruneResult, check_sparsity, prune_optspa, prune_sparsegpt, prune_wanda
from .samplers import coarse_popsize, make_pruner, make_sampler
from .search_config import SearchConfig, SearchError
from .search_space import Allocation, SearchSpace, Unit, profile_counts, realized_profile
from .sparsity import SparsityType
from .study import open_study

logger = logging.getLogger(__name__)


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
                pruned_at = cfg.target if cfg.trial_stats == "uniform" else None
                self.oneshot = oneshot_pruner(model, calib, cfg.method, space.count_bounds(), device, offload,
                                              self.snapshot, cfg.blocksize, cfg.percdamp, pruned_at)
                logger.info("oneshot %s state from %s in %.1f s", cfg.method, "dense activations"
                            if pruned_at is None else f"its uniform sequential pruning at {pruned_at:g}",
                            time.perf_counter() - t0)

    def memory(self) -> dict[str, float]:
        """Bytes the search holds besides the model, and the ratio to the model's decoder linears."""
        linears = sum(m.weight.numel() * m.weight.element_size()
                      for layer in decoder_layers(self.model) for m in layer.modules() if isinstance(m, nn.Linear))
        band = self.oneshot.nbytes() if self.oneshot is not None else 0
        factors = self.oneshot.host_nbytes() if self.oneshot is not None else 0
        snap = self.snapshot.nbytes() if self.snapshot is not None else 0
        return {"decoder_linear_bytes": linears, "oneshot_band_bytes": band, "host_snapshot_bytes": snap,
                "oneshot_host_bytes": factors, "band_ratio": band / linears if linears else 0.0,
                "total_ratio": (band + snap + factors) / linears}

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

    def put_back(self, prof: Profile, how: str, res: PruneResult) -> None:
        """The model ``prof`` pruned ``how`` ("oneshot" or "sequential") gave, with masks ``res``, exactly as it
        was scored: Wanda-style pruning only zeroes weights, so dense x its masks; SparseGPT moved the weights
        it kept, so it is pruned again (deterministic: the same model)."""
        if self.cfg.method in SCORES:
            self.restore_masks(res)
        elif how == "oneshot":
            self.oneshot.rebuild(profile_counts(prof, self.shapes))
        else:
            self.reprune(prof)

    def score(self, alloc: Allocation, report=None, should_stop=None, objective: Objective | None = None) -> float:
        from .kvquant import simulate_kv_quant

        with simulate_kv_quant(self.model, self.kv_config(alloc)):
            return (objective or self.objective)(report, should_stop)


def allocation_of(space: SearchSpace, t) -> Allocation:
    """The allocation a finished trial evaluated (from its user attributes)."""
    ua = t.user_attrs
    kv = None
    if ua.get("key_bits") is not None:
        kv = list(ua["key_bits"]) + (list(ua["value_bits"]) if space.cfg.kv_separate else [])
    return space.allocation(ua.get("levels"), kv)


class StudySearch:
    """Restart ``index`` of a run: its own study (``name``), space (trend_layer's refine center is per study)
    and sampler seeded ``seed``. Opening it checks the study against this run's space and scoring before any
    work; :meth:`run` runs (or resumes) it to its trials or budget with a shared :class:`TrialRunner`."""

    def __init__(self, cfg: SearchConfig, index: int, name: str, seed: int, url: str, model_name: str,
                 shapes: dict[Unit, tuple[int, int]], num_layers: int, scoring: str, nwin: int):
        import optuna

        self.cfg, self.index, self.name, self.seed, self.url, self.nwin = cfg, index, name, seed, url, nwin
        self.space = SearchSpace(cfg, shapes, num_layers)
        self.bounds = self.space.search_bounds()  # what level switches may move; updated when trend_layer refines
        self.coarse = cfg.coarse_sampler if cfg.searches_sparsity and cfg.granularity == "trend_layer" else None
        self.finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        sampler = make_sampler(cfg.sampler, seed, self.space.uniform_params(), self.bounds, self._repair_key,
                               self.coarse,
                               coarse_popsize(cfg.coarse_evals, len(self.space.trend_param_names()))
                               if self.coarse else None, cfg.startup_scale)
        self.study = open_study(cfg, name, url, self.space.fingerprint(), scoring, model_name, sampler,
                                make_pruner(cfg.pruner, nwin, cfg.coarse_pruner if self.coarse else None))
        self.runner: TrialRunner | None = None
        self.refine_stage()  # a resumed study refines where it left off

    def _repair_key(self, params: dict[str, Any]) -> str:
        cfg, space = self.cfg, self.space
        levels = space.raw_levels(params) if cfg.searches_sparsity else None
        kv_names = space.kv_param_names() if cfg.searches_kv else []
        if (cfg.searches_sparsity and levels is None) or any(n not in params for n in kv_names):
            return ""  # a partial sample: no point to compare yet
        kv = [params[n] for n in kv_names]
        return space.allocation(levels, space.kv_from_priorities(kv) if kv else None).key()

    def trials(self, states=None) -> list:
        return self.study.get_trials(deepcopy=False, states=states or self.finished)

    def complete(self) -> list:
        import optuna

        return self.trials((optuna.trial.TrialState.COMPLETE,))

    def cost(self) -> float:
        """Full-evaluation equivalents the finished trials spent."""
        return sum((t.user_attrs.get("windows") or 0) for t in self.trials()) / self.nwin

    def refine_stage(self) -> None:
        """trend_layer: once the trend's share is spent, fix the center (the best trend so far) in the study,
        so every worker and every resume refines around the same levels."""
        cfg, space = self.cfg, self.space
        if cfg.granularity != "trend_layer" or not cfg.searches_sparsity or space.center is not None:
            return
        stored = self.study.user_attrs.get("refine_center")  # set by an earlier run or another worker
        if stored is None:
            spent = (self.cost() / cfg.budget_evals if cfg.budget_evals is not None
                     else len(self.trials()) / cfg.n_trials)
            if spent < cfg.coarse_fraction:
                return
            coarse = [t for t in self.complete() if space.is_trend_trial(t.params)]
            if not coarse:
                return
            best_coarse = min(coarse, key=lambda t: (t.value, t.number))
            stored = list(best_coarse.user_attrs["levels"])
            self.study.set_user_attr("refine_center", stored)
            self.study.set_user_attr("refine_center_trial", best_coarse.number)
            logger.info("trend_layer: refining every layer around trial %d (%s %.4f)", best_coarse.number,
                        cfg.objective, best_coarse.value)
        space.set_center(stored)
        self.bounds.clear()  # in place: the sampler holds this dict
        self.bounds.update(space.search_bounds())

    def describe(self, seqlen: int) -> str:
        cfg, coarse = self.cfg, self.coarse
        units = ""
        if cfg.searches_sparsity:
            units = f"; {cfg.granularity} units within {cfg.target:g} +- {cfg.sparsity_range:g}"
            if cfg.granularity == "trend_layer":
                units += f", the trend for {cfg.coarse_fraction:g} of the evaluations"
        sampler = cfg.sampler + (f" (trend stage: {coarse})" if coarse and coarse != cfg.sampler else "")
        pruner = cfg.pruner + (f" (trend stage: {cfg.coarse_pruner})"
                               if coarse and cfg.coarse_pruner != cfg.pruner else "")
        return (f"study '{self.name}' ({self.url.split('@')[-1]}): {len(self.trials())} of {cfg.n_trials} trials "
                f"finished; {sampler} sampler (seed {self.seed}), {pruner} pruner, objective {cfg.objective} on "
                f"{self.nwin} windows of {seqlen}{units}")

    def _duplicate(self, trial, key: str) -> float | None:
        """An evaluated point's value, reused by ``trial`` at no cost (None: a new point)."""
        dup = next((t for t in self.complete() if t.user_attrs.get("key") == key), None)
        if dup is None:
            return None
        for k in ("mean_sparsity", "realized_sparsity", "kv_avg_bits", "feasible", "layer_sparsity",
                  "module_sparsity"):
            trial.set_user_attr(k, dup.user_attrs.get(k))
        trial.set_user_attr("duplicate_of", dup.number)
        trial.set_user_attr("windows", 0)
        return dup.value

    def objective(self, trial) -> float:
        import optuna

        cfg, space, runner, nwin = self.cfg, self.space, self.runner, self.nwin
        self.refine_stage()
        alloc = space.suggest(trial)
        key = alloc.key()
        for k, v in {"key": key, "levels": alloc.levels, "key_bits": alloc.key_bits,
                     "value_bits": alloc.value_bits}.items():
            trial.set_user_attr(k, v)
        trend_stage = cfg.granularity == "trend_layer" and space.is_trend_trial(trial.params)
        if cfg.granularity == "trend_layer":
            trial.set_user_attr("stage", "trend" if trend_stage else "layer")
        dup = self._duplicate(trial, key)
        if dup is not None:
            return dup
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
        # the elite mean is one evaluation chosen on purpose: never stopped on its first windows' noise
        rule = "none" if trial.user_attrs.get("elite_mean") else cfg.coarse_pruner if trend_stage else cfg.pruner
        trial.set_user_attr("pruner", rule)  # the stopping rule this trial was judged by (stages may differ)
        should_stop = None if rule == "none" else trial.should_prune
        try:
            value = runner.score(alloc, lambda step, v: trial.report(v, step), should_stop)
        except Stopped as stop:
            trial.set_user_attr("windows", stop.windows)
            trial.set_user_attr("trial_seconds", time.perf_counter() - t0)
            logger.info("trial %d stopped by the pruner after %d of %d windows", trial.number, stop.windows, nwin)
            raise optuna.TrialPruned() from None
        t2 = time.perf_counter()
        for k, v in {"windows": nwin, "apply_seconds": t1 - t0, "eval_seconds": t2 - t1,
                     "trial_seconds": t2 - t0}.items():
            trial.set_user_attr(k, v)
        logger.info("trial %d: %s %.4f (sparsity %s, kv avg %s) in %.2f s", trial.number, cfg.objective, value,
                    f"{realized:.4f}" if realized is not None else "-",
                    f"{kv_avg:.2f}" if kv_avg is not None else "-", t2 - t0)
        return value

    def run(self, runner: TrialRunner, progress: bool = True) -> None:
        """Run the study's remaining trials (completed ones are never redone) until ``n_trials`` finished trials
        or the evaluation budget."""
        cfg = self.cfg
        self.runner = runner
        reserve = 1 if cfg.elite_mean else 0  # the budget's last evaluation is the elite mean's
        n_trials = cfg.n_trials - reserve
        budget = cfg.budget_evals - reserve if cfg.budget_evals is not None else None
        done = len(self.trials())
        if done < n_trials and (budget is None or self.cost() < budget):
            self._optimize(n_trials, budget, done, progress)
        if cfg.elite_mean:
            self._elite_trial()

    def _optimize(self, n_trials: int, budget: float | None, done: int, progress: bool) -> None:
        import optuna

        cfg = self.cfg
        desc = f"search {cfg.kind}" + (f" {self.index + 1}/{cfg.restarts}" if cfg.restarts > 1 else "")
        bar = tqdm(total=cfg.n_trials, initial=done, desc=desc, disable=not progress)

        def on_trial(study, _trial) -> None:
            self.refine_stage()  # before the next trial is created: its sampler follows the stage
            bar.n = len(self.trials())
            try:
                bar.set_postfix(best=f"{study.best_value:.4f}", cost=f"{self.cost():.1f}", refresh=False)
            except ValueError:
                pass
            bar.refresh()
            if budget is not None and self.cost() >= budget:
                study.stop()

        try:
            self.study.optimize(self.objective, n_trials=n_trials - done, gc_after_trial=False,
                                callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=self.finished),
                                           on_trial])
        finally:
            bar.close()

    def elite_params(self) -> dict[str, Any] | None:
        """The mean of the ``elite_mean`` best distinct complete trials' parameters in the current stage's space
        (integers rounded; trend_layer's refine center counts as no move): CMA-ES's recombination. A few
        objective windows rank the best points by noise as much as by quality; their mean averages it out.
        None when fewer than two such trials exist."""
        space, center = self.space, self.study.user_attrs.get("refine_center_trial")
        refine = space.center is not None
        names = space.refine_param_names() if refine else None
        seen, elite = set(), []
        for t in sorted(self.complete(), key=lambda t: (t.value, t.number)):
            key = t.user_attrs.get("key")
            if key in seen or t.user_attrs.get("duplicate_of") is not None or t.user_attrs.get("feasible") is False:
                continue
            if refine and t.number == center:
                params = dict.fromkeys(names, 0)
            elif refine and not all(n in t.params for n in names):
                continue  # another trend: not a point of the refine stage's space
            else:
                params = dict(t.params)
            if elite and set(params) != set(elite[0][1]):
                continue
            seen.add(key)
            elite.append((t, params))
            if len(elite) == self.cfg.elite_mean:
                break
        if len(elite) < 2:
            return None
        out = {}
        for n in elite[0][1]:
            values = [p[n] for _, p in elite]
            v = sum(values) / len(values)
            # integer parameters (levels, per-layer moves) stay integers: Optuna returns ints for them
            out[n] = int(math.floor(v + 0.5)) if all(isinstance(x, int) for x in values) else v
        return out

    def _elite_trial(self) -> None:
        """Evaluate the elite mean once per study. A study that has it finished, or a live worker running it, does
        not again; a killed run's (its heartbeat stale: failed, and queued again by the storage's retry callback)
        is evaluated now, as any killed trial is redone. Journal files keep no heartbeats: a RUNNING elite trial
        there counts as another worker's."""
        import optuna
        from optuna.storages import fail_stale_trials

        state = optuna.trial.TrialState
        with warnings.catch_warnings():  # "experimental" since Optuna 2.9, as heartbeats are
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            fail_stale_trials(self.study)  # a no-op without heartbeats

        def marked() -> list:
            return [t for t in self.study.get_trials(deepcopy=False) if "elite_mean" in t.user_attrs]

        if any(t.state in (state.COMPLETE, state.PRUNED, state.RUNNING) for t in marked()):
            return
        self.refine_stage()
        if not any(t.state == state.WAITING for t in marked()):
            params = self.elite_params()
            if params is None:
                logger.info("elite mean: fewer than two distinct complete trials to average; none evaluated")
                return
            self.study.enqueue_trial(params, user_attrs={"elite_mean": self.cfg.elite_mean})
        # queued trials run oldest first: a killed ordinary trial queued again may come before the elite mean
        while any(t.state == state.WAITING for t in marked()):
            self.study.optimize(self.objective, n_trials=1, gc_after_trial=False)
        for t in marked():
            if t.state == state.COMPLETE:
                logger.info("elite mean of the %d best trials: trial %d, %s %.4f (best %.4f)", self.cfg.elite_mean,
                            t.number, self.cfg.objective, t.value, self.study.best_value)
