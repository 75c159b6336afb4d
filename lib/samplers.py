"""Optuna samplers and pruners for the search, all through Optuna's own interfaces.

* :class:`TrialSeededSampler` wraps any sampler so that trial ``n`` draws from ``(seed, n)``: one worker is
  reproducible, and workers sharing a study never repeat each other's random points (trial numbers are
  unique in a storage). Trial 0 is the uniform allocation, by construction rather than by an enqueue that
  two workers could both make. Relative samples that repeat an evaluated point are moved by level switches.
* :class:`LevelSwitchSampler`: an evolutionary sampler in the style of EvoPress. A child is a parent chosen
  by tournament among the best completed trials with a few level switches (one unit up, another down by the
  same number of levels; levels are measured in weights, so every switch keeps the budget exact). KV
  priorities (joint searches) are inherited with a small Gaussian change.
* trend_layer's coarse stage may sample with CMA-ES (``coarse="cmaes"``), a local search from the uniform
  allocation, while the refine stage keeps the chosen sampler: the factory looks at the shared ``bounds``,
  which the refine stage fills in place.
* :class:`LocalStartupTPESampler`: TPE whose random start-up draws span ``startup_scale`` of each sparsity
  parameter's range around 0 (the uniform allocation) instead of the whole box.
* Pruners: ``median`` (Optuna's MedianPruner on the running objective), ``running``
  (:class:`RunningMedianPruner`: the median rule on the value at the current window rather than the trial's
  best so far), ``halving`` (successive halving), ``baseline`` (:class:`BaselinePruner`: a trial worse than the
  uniform allocation, trial 0, at the same window is stopped, otherwise the median rule decides), ``none``.
"""
from __future__ import annotations

import math
import random
import statistics
import warnings
from typing import Any, Callable

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

SAMPLERS = ("tpe", "gp", "cmaes", "evolution", "random")
COARSE_SAMPLERS = ("tpe", "cmaes")  # trend_layer's coarse stage (nine real numbers); its refine stage uses --sampler
PRUNERS = ("none", "median", "running", "halving", "baseline")


def _trial_seed(seed: int, number: int) -> int:
    return (seed * 1_000_003 + number * 7_919 + 17) % (2**31 - 1)


class LevelSwitchSampler(BaseSampler):
    """EvoPress-style evolution over integer levels (see the module docstring)."""

    def __init__(self, bounds: dict[str, tuple[int, int]], seed: int = 0, population: int = 4,
                 max_switches: int = 3, kv_sigma: float = 0.15):
        self.bounds = bounds
        self.population = population
        self.max_switches = max_switches
        self.kv_sigma = kv_sigma
        self._rng = random.Random(seed)
        self._fallback = optuna.samplers.RandomSampler(seed=seed)

    def reseed_rng(self) -> None:
        self._rng.seed()
        self._fallback.reseed_rng()

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        return {}  # everything goes through sample_independent, parent by parent

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        return {}

    def _parent(self, study) -> FrozenTrial | None:
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        if not done:
            return None
        done.sort(key=lambda t: t.value)
        pool = done[: self.population]
        a, b = self._rng.choice(pool), self._rng.choice(pool)
        return a if a.value <= b.value else b

    def _child(self, study, trial) -> dict[str, Any]:
        parent = self._parent(study)
        if parent is None:
            return {}
        child = dict(parent.params)
        names = [n for n in self.bounds if n in child]
        for _ in range(self._rng.randint(1, self.max_switches)):
            if len(names) < 2:
                break
            up, down = self._rng.sample(names, 2)
            room = min(self.bounds[up][1] - child[up], child[down] - self.bounds[down][0])
            if room > 0:
                step = self._rng.randint(1, max(1, min(room, 2)))
                child[up] += step
                child[down] -= step
        for n, v in parent.params.items():
            if n not in self.bounds and isinstance(v, float):
                child[n] = min(1.0, max(0.0, v + self._rng.gauss(0.0, self.kv_sigma)))
        return child

    def before_trial(self, study, trial) -> None:
        # One instance serves one trial (TrialSeededSampler makes a sampler per trial number).
        self._child_params = self._child(study, trial)

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        child = getattr(self, "_child_params", None) or {}
        if param_name in child:
            value = child[param_name]
            if isinstance(param_distribution, IntDistribution) and \
                    param_distribution.low <= value <= param_distribution.high:
                return value
            if isinstance(param_distribution, FloatDistribution):
                return min(param_distribution.high, max(param_distribution.low, value))
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)


class TrialSeededSampler(BaseSampler):
    """Delegates trial ``n`` to ``factory(seed_n)``; trial 0 gets ``fixed`` (the uniform point)."""

    def __init__(self, factory: Callable[[int], BaseSampler], seed: int, fixed: dict[str, Any] | None = None,
                 repair_key: Callable[[dict[str, Any]], str] | None = None,
                 switch: Callable[[dict[str, Any], random.Random], dict[str, Any]] | None = None):
        self.factory, self.seed, self.fixed = factory, seed, fixed or {}
        self.repair_key, self.switch = repair_key, switch
        self._cache: dict[int, BaseSampler] = {}

    def _for(self, trial) -> BaseSampler:
        n = trial.number
        if n not in self._cache:
            self._cache = {n: self.factory(_trial_seed(self.seed, n))}  # one live sampler: the current trial
        return self._cache[n]

    def reseed_rng(self) -> None:  # seeds come from trial numbers
        pass

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        if trial.number == 0 and self.fixed:
            return {}
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        if not search_space:  # trial 0, or nothing to model yet (grouped TPE expects its own inference first)
            return {}
        params = self._for(trial).sample_relative(study, trial, search_space)
        if params and self.repair_key is not None and self.switch is not None:
            seen = {t.user_attrs.get("key") for t in study.get_trials(deepcopy=False)
                    if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED)}
            rng = random.Random(_trial_seed(self.seed, trial.number) + 1)
            tries = 0
            while self.repair_key(params) in seen and tries < 50:  # an evaluated point: move it
                params = self.switch(params, rng)
                tries += 1
        return params

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        if trial.number == 0 and param_name in self.fixed:
            return self.fixed[param_name]
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        if trial.number != 0 or not self.fixed:
            self._for(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        if trial.number in self._cache:
            self._cache[trial.number].after_trial(study, trial, state, values)


class LocalStartupTPESampler(optuna.samplers.TPESampler):
    """TPE whose start-up draws (the first ``n_startup_trials`` finished trials, as TPE counts them) are uniform
    within ``startup_scale`` of each sparsity parameter's range around 0, the uniform allocation; after the
    start-up TPE models the whole range as usual.

    Why: in trend_layer's trend stage TPE's ten uniform draws over nine numbers of +-range are most of the stage
    (12.5 evaluations by default), and at 70% on SmolLM2 most of them scored 2 to 300 times the uniform
    allocation's perplexity: the stage's best trend, around which every layer is then refined, was whichever
    draw happened to be least bad. (Measured: it narrows the spread over sampler seeds without raising the
    result; README, "Search results".) Only parameters whose range holds 0 strictly inside are shrunk
    (sparsity levels and trend numbers, not KV priorities in [0, 1])."""

    def __init__(self, *, startup_scale: float, seed: int, n_startup_trials: int = 10, **kwargs: Any):
        super().__init__(seed=seed, n_startup_trials=n_startup_trials, **kwargs)
        self._startup_scale = startup_scale
        self._startup_trials = n_startup_trials
        self._startup_rng = random.Random(seed)

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        d = param_distribution
        local = (self._startup_scale < 1 and isinstance(d, (FloatDistribution, IntDistribution))
                 and d.low < 0 < d.high and not d.log)
        if local and len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))) \
                < self._startup_trials:
            lo, hi = d.low * self._startup_scale, d.high * self._startup_scale
            if isinstance(d, IntDistribution):
                return self._startup_rng.randint(math.ceil(lo), math.floor(hi))
            return self._startup_rng.uniform(lo, hi)
        return super().sample_independent(study, trial, param_name, param_distribution)


def coarse_popsize(coarse_evals: float | None, dim: int) -> int:
    """CMA-ES population of a coarse stage: its standard one (4 + 3 ln dim), smaller when the stage's budget would
    not hold three generations of it (a single generation is only a random draw around the start), never under 4."""
    standard = 4 + int(3 * math.log(dim))
    if coarse_evals is None:
        return standard
    return max(4, min(standard, int(coarse_evals // 3)))


def base_sampler_factory(name: str, uniform: dict[str, Any], bounds: dict[str, tuple[int, int]],
                         coarse: str | None = None, coarse_popsize: int | None = None,
                         startup_scale: float = 1.0) -> Callable[[int], BaseSampler]:
    """A factory of the chosen Optuna sampler for one seed. ``coarse``: trend_layer's coarse stage samples with
    this one while ``bounds`` is empty (the refine stage fills it in place with the per-layer moves).
    ``startup_scale``: TPE's start-up draws span that share of each sparsity range
    (:class:`LocalStartupTPESampler`)."""
    def make(seed: int) -> BaseSampler:
        with warnings.catch_warnings():  # multivariate TPE, GP, CMA-ES's pruned trials are "experimental"; they work
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if coarse == "cmaes" and not bounds:
                # A local search from the uniform allocation (CMA-ES starts at the box's center, level 0
                # everywhere, sigma a sixth of the box): TPE's uniform random start-up in nine dimensions of
                # +-range mostly draws trends far worse than uniform. --pruner auto runs this stage unpruned; with a
                # pruner asked for, stopped trials count by their last value.
                return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=1, warn_independent_sampling=False,
                                                    consider_pruned_trials=True, popsize=coarse_popsize)
            return _sampler(name, seed, bounds, startup_scale)
    return make


def _sampler(name: str, seed: int, bounds: dict[str, tuple[int, int]], startup_scale: float = 1.0) -> BaseSampler:
    """One of :data:`SAMPLERS`, seeded."""
    if name == "tpe":  # multivariate models the coupled levels; constant liar spreads parallel workers;
        # group: trend_layer's two stages have different parameters (define-by-run)
        kw = dict(seed=seed, multivariate=True, group=True, constant_liar=True, n_startup_trials=10)
        if startup_scale < 1:
            return LocalStartupTPESampler(startup_scale=startup_scale, **kw)
        return optuna.samplers.TPESampler(**kw)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=10)
    if name == "cmaes":  # its mean starts mid-range: level 0, the uniform allocation
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=1, warn_independent_sampling=False)
    if name == "evolution":
        return LevelSwitchSampler(bounds, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}")


def make_sampler(name: str, seed: int, uniform: dict[str, Any], bounds: dict[str, tuple[int, int]],
                 repair_key: Callable[[dict[str, Any]], str] | None = None, coarse: str | None = None,
                 coarse_popsize: int | None = None, startup_scale: float = 1.0) -> BaseSampler:
    def switch(params: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        params = dict(params)
        names = [n for n in bounds if n in params]
        for _ in range(8):
            if len(names) < 2:
                break
            up, down = rng.sample(names, 2)
            if params[up] < bounds[up][1] and params[down] > bounds[down][0]:
                params[up] += 1
                params[down] -= 1
                break
        return params

    factory = base_sampler_factory(name, uniform, bounds, coarse, coarse_popsize, startup_scale)
    return TrialSeededSampler(factory, seed, fixed=uniform, repair_key=repair_key, switch=switch)


class BaselinePruner(optuna.pruners.BasePruner):
    """Stops a trial whose running value is worse than the baseline's at the same step, the baseline being trial 0
    (the uniform allocation, by construction of :class:`TrialSeededSampler`); otherwise ``inner`` decides.

    Why: the median rule compares with the median of the finished trials, and at the start of a search those are
    the random start-up draws, mostly far worse than uniform (at 70% on SmolLM2, 10 to 300 times its
    perplexity), so it lets them run to the end: 9 of the 12.5 evaluations of the default's trend stage at 70%
    went to such draws. A point worse than uniform is never shipped, so it is stopped at the first step the
    warm-up allows."""

    def __init__(self, inner: optuna.pruners.BasePruner, n_warmup_steps: int = 0):
        self._inner = inner
        self._n_warmup_steps = n_warmup_steps
        self._baseline: dict[int, float] | None = None

    def _baseline_values(self, study: optuna.Study) -> dict[int, float] | None:
        if self._baseline is None:  # cached once trial 0 has finished; another worker may still be running it
            first = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.number == 0]
            if first:
                self._baseline = dict(first[0].intermediate_values)
        return self._baseline

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if trial.number != 0 and step is not None and step >= self._n_warmup_steps:
            baseline = self._baseline_values(study)
            if baseline is not None and step in baseline:
                value = trial.intermediate_values[step]
                sign = 1 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1
                if sign * (value - baseline[step]) > 0:
                    return True
        return self._inner.prune(study, trial)


class RunningMedianPruner(optuna.pruners.BasePruner):
    """Stops a trial whose value at the current step is worse than the median of the finished trials' values at
    that step (after ``n_startup_trials`` finished trials and from step ``n_warmup_steps`` on).

    Why not Optuna's MedianPruner: it compares a trial's *best* value over its steps, right for a learning curve;
    here a step is one more window in a running mean, and its best is mostly its first window's. In every
    median-pruned SmolLM2 search of the benchmark, all but one stopped trial was stopped after its first window:
    the rule judged one window and let every trial that passed it run to the end."""

    def __init__(self, n_startup_trials: int = 5, n_warmup_steps: int = 0):
        self._n_startup_trials = n_startup_trials
        self._n_warmup_steps = n_warmup_steps

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self._n_warmup_steps:
            return False
        value = trial.intermediate_values[step]
        if math.isnan(value):
            return True
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(done) < self._n_startup_trials:
            return False
        others = [v for t in done if not math.isnan(v := t.intermediate_values.get(step, math.nan))]
        if not others:
            return False
        median = statistics.median(others)
        if study.direction == optuna.study.StudyDirection.MAXIMIZE:
            return value < median
        return value > median


class StagePruner(optuna.pruners.BasePruner):
    """One pruner per stopping rule; each trial is judged by the rule named in its ``pruner`` user attribute (set
    before it reports), so trend_layer's two stages may stop trials by different rules in one study."""

    def __init__(self, rules: dict[str, optuna.pruners.BasePruner], fallback: str):
        self._rules = rules
        self._fallback = fallback

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return self._rules[trial.user_attrs.get("pruner", self._fallback)].prune(study, trial)


def make_pruner(name: str, nwin: int, coarse: str | None = None) -> optuna.pruners.BasePruner:
    """Steps are windows scored. A trial may be stopped from step ``nwin // 4 - 1`` on (at least 1): after its
    first window with 8 objective windows (every window is a step there), after 16 of 64 (steps of 8).
    ``coarse``: the trend stage's rule where it differs from ``name``."""
    if coarse is not None and coarse != name:
        return StagePruner({r: make_pruner(r, nwin) for r in (name, coarse)}, name)
    warmup = max(1, nwin // 4) - 1
    if name == "none":
        return optuna.pruners.NopPruner()
    if name in ("median", "baseline"):
        median = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=warmup)
        return median if name == "median" else BaselinePruner(median, warmup)
    if name == "running":
        return RunningMedianPruner(n_startup_trials=5, n_warmup_steps=warmup)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, nwin // 4), reduction_factor=3)
    raise ValueError(f"unknown pruner {name!r}")


__all__ = ["SAMPLERS", "COARSE_SAMPLERS", "PRUNERS", "LocalStartupTPESampler", "coarse_popsize", "make_sampler",
           "make_pruner", "LevelSwitchSampler", "TrialSeededSampler", "BaselinePruner", "RunningMedianPruner",
           "StagePruner",
           "IntDistribution", "FloatDistribution"]
