"""Search settings: :class:`SearchConfig`, the defaults the benchmark's ablations chose, and the checks that refuse
settings which cannot work (one line for the user, before any model is loaded)."""
from __future__ import annotations

from dataclasses import dataclass

SEARCH_KINDS = ("sparsity", "kv", "joint")
GRANULARITIES = ("block", "layer", "module", "block_module", "trend", "trend_layer")
TREND_DEPTH_PARAMS = ("trend_slope", "trend_curve")
TRIAL_MODES = ("oneshot", "sequential")
TRIAL_STATS = ("dense", "uniform")
OBJECTIVES = ("ppl", "kl")
SEARCH_METHODS = ("wanda", "optspa", "sparsegpt")
# Chosen from the ablations in scripts/bench_search.py (README, "Search results").
DEFAULT_GRANULARITY = "trend_layer"  # above LOW_TARGET; up to it, the trend alone (default_granularity)
# Up to this target the default search is the trend alone, its trials on the uniform pruning's statistics.
LOW_TARGET = 0.55


def default_sparsity_range(target: float) -> float:
    """The range searched around ``target`` when none is given: +-0.2 up to 60%, +-0.3 from 70%, in between
    linearly. In the SmolLM2 ablation (README, "Range") +-0.2 won at 50% and 60% and +-0.3 at 70% with both
    bases: the higher the target, the more some layers need to be kept denser than others."""
    return round(min(0.3, max(0.2, target - 0.4)), 6)


def default_coarse_fraction(target: float) -> float:
    """``trend_layer``'s share of the evaluations spent on the trend when none is given: a quarter up to 50%, half
    from 60%, in between linearly. In the SmolLM2 ablation (README, "The trend's share") half won every paired
    sampler seed with the optspa base at 60% and 70% and lost at 50% with both bases; at 70% with the Wanda base
    it lost both seeds by less than the seed's own spread."""
    return round(min(0.5, max(0.25, 0.25 + 2.5 * (target - 0.5))), 6)


def low_target(target: float) -> bool:
    """Whether ``target`` takes the low-target defaults (up to LOW_TARGET; float noise in the flag forgiven)."""
    return target <= LOW_TARGET + 1e-9


def default_granularity(target: float) -> str:
    """The units when none are given: the nine-number trend alone up to a 55% target, ``trend_layer`` (the
    trend, then every layer around the best one) above. In the SmolLM2 ablation (README, "The default up to
    55%") the trend alone on the uniform pruning's statistics won at 50% with all three bases (four sampler seeds
    with optspa and Wanda, one with SparseGPT); at 60% the per-layer refinement won (one seed). The cut sits
    midway, where nothing was measured."""
    return "trend" if low_target(target) else DEFAULT_GRANULARITY


def default_restarts(target: float, kind: str, method: str) -> int:
    """Independent searches when none are asked for: two for a Wanda or Optspa sparsity search above a 55% target,
    else one. On SmolLM2 (optspa, full test set) a single search's draws spread widely there: 0.249-0.368 of the
    gap at 60% (mean 0.318 over three seeds), 0.596-0.729 at 70% (0.665 over four); two restarts and their mean
    closed 0.357-0.385 (mean 0.370) and 0.676-0.763 (0.724) over three pairs (README, "More draws of the
    defaults"). At 50% they did not help (optspa: 0.136 against the seeds' 0.142; Wanda: seed 0's model shipped).
    SparseGPT keeps one search: at 60% two restarts shipped the first one's model in 2.8 times its time (its
    sequential re-prunes, one per restart and one for the mean, take minutes each on a CPU)."""
    return 2 if kind == "sparsity" and method != "sparsegpt" and not low_target(target) else 1


def default_restart_mean(target: float, kind: str, restarts: int, method: str) -> bool:
    """Whether the restarts' mean is tried when not asked: with two or more restarts of a search whose default is
    two (it shipped in two of three pairs at 70% with optspa and at 60% with Wanda; it lost at 50%, at 60% with
    optspa and SparseGPT, at 70% with Wanda). It costs one evaluation and a sequential pruning, and ships only when
    it beats every restart's model."""
    return restarts >= 2 and default_restarts(target, kind, method) >= 2


def default_trial_stats(target: float, trial_mode: str) -> str:
    """Oneshot trials' activations when none are given: up to a 55% target the method's uniform sequential
    pruning's (one such pruning at setup), above it the dense model's (they lost at 60% and 70% on SmolLM2)."""
    return "uniform" if trial_mode == "oneshot" and low_target(target) else "dense"


class SearchError(ValueError):
    """A search setting that cannot work (bad space, study mismatch); one line for the user."""


def default_pruner(sampler: str) -> str:
    """Optuna's GP and CMA-ES samplers model complete trials only: a stopped trial teaches them nothing, so they
    propose the same region again (at 70% on SmolLM2, GP with the median pruner had 83 of 100 trials stopped after
    one window). They search without a pruner; the others stop hopeless trials with the median rule."""
    return "none" if sampler in ("gp", "cmaes") else "median"


def selection_nsamples(select_nsamples: int | None, objective_nsamples: int) -> int:
    """Windows of the selection on more windows: as asked, or 4x the objective's."""
    return select_nsamples or 4 * objective_nsamples


@dataclass
class SearchConfig:
    target: float
    kind: str = "sparsity"
    granularity: str | None = None  # None: default_granularity(target)
    num_blocks: int = 8
    coarse_fraction: float | None = None  # trend_layer: the trend's share of the evaluations; None: by target
    coarse_sampler: str = "tpe"  # trend_layer: the sampler of the trend stage (the refine stage uses ``sampler``)
    startup_scale: float = 1.0  # TPE's random start-up draws span this share of each sparsity range around 0
    trend_types: bool = True  # trend: one offset per projection type besides the depth terms
    sparsity_range: float | None = None  # None: default_sparsity_range(target)
    sparsity_step: float = 0.025
    kv_bits_choices: tuple[int, ...] = (6, 8)
    kv_avg_bits: float | None = None  # None: the mean of the lowest and highest choice
    kv_separate: bool = False  # keys and values get their own bits
    n_trials: int = 100  # finished trials (complete or pruned)
    budget_evals: float | None = None  # cap in full objective evaluations
    seed: int = 0
    trial_mode: str = "oneshot"
    # oneshot trials' activations: the dense model's, or those of the method's uniform sequential pruning at
    # the target (lib/oneshot.py); None: default_trial_stats(target, trial_mode)
    trial_stats: str | None = None
    method: str = "optspa"
    sampler: str = "tpe"
    pruner: str = "auto"  # auto: median, or none for samplers that learn from complete trials only (gp, cmaes)
    # trend_layer's trend stage: auto follows ``pruner``, and with ``pruner`` auto takes the rule for its own
    # sampler (so a CMA-ES trend stage runs unpruned while the TPE refine stage stops hopeless trials)
    coarse_pruner: str = "auto"
    reprune_top: int = 1
    restarts: int | None = None  # independent searches seeded seed, seed + 1, ...; None: default_restarts
    # after the restarts: the mean of their best allocations, shipped only if it wins; None: default_restart_mean
    restart_mean: bool | None = None
    select_top: int = 0  # after the search: the K best trials scored again on more windows, the best of them ships
    elite_mean: int = 0  # the budget's last trial: the mean of the K best trials' parameters (0: none)
    select_nsamples: int | None = None  # the selection's windows; None: 4x the objective's
    objective: str = "ppl"
    storage: str | None = None  # None: sqlite file in save_dir
    study_name: str | None = None
    save_dir: str | None = None
    batch_size: int = 1
    blocksize: int = 128  # SparseGPT, for its trials and re-prunes
    percdamp: float = 0.01
    heartbeat_seconds: int = 60

    def __post_init__(self) -> None:
        if self.sparsity_range is None:
            self.sparsity_range = default_sparsity_range(self.target)
        if self.coarse_fraction is None:
            self.coarse_fraction = default_coarse_fraction(self.target)
        # A KV-only search prunes nothing in its trials: the old defaults keep its study names and fingerprints.
        if self.granularity is None:
            self.granularity = default_granularity(self.target) if self.searches_sparsity else DEFAULT_GRANULARITY
        if self.trial_stats is None:
            self.trial_stats = default_trial_stats(self.target, self.trial_mode) if self.searches_sparsity else "dense"
        if self.restarts is None:
            self.restarts = default_restarts(self.target, self.kind, self.method)
        if self.restart_mean is None:
            self.restart_mean = default_restart_mean(self.target, self.kind, self.restarts, self.method)
        if self.coarse_pruner == "auto":
            self.coarse_pruner = default_pruner(self.coarse_sampler) if self.pruner == "auto" else self.pruner
        if self.pruner == "auto":
            self.pruner = default_pruner(self.sampler)

    @property
    def coarse_evals(self) -> float:
        """trend_layer: what the trend stage may spend, in full evaluations (in trials without a budget)."""
        return self.coarse_fraction * (self.budget_evals if self.budget_evals is not None else self.n_trials)

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
        from .samplers import COARSE_SAMPLERS, PRUNERS, SAMPLERS

        if self.kind not in SEARCH_KINDS:
            raise SearchError(f"unknown search {self.kind!r} (choose from {', '.join(SEARCH_KINDS)})")
        if self.granularity not in GRANULARITIES:
            raise SearchError(f"unknown --search_granularity {self.granularity!r}")
        if self.trial_mode not in TRIAL_MODES:
            raise SearchError(f"unknown --trial_mode {self.trial_mode!r}")
        if self.trial_stats not in TRIAL_STATS:
            raise SearchError(f"unknown --trial_stats {self.trial_stats!r}")
        if self.trial_stats != "dense" and self.trial_mode != "oneshot":
            raise SearchError("--trial_stats applies to oneshot trials only (--trial_mode oneshot)")
        if self.objective not in OBJECTIVES:
            raise SearchError(f"unknown --objective {self.objective!r}")
        if self.sampler not in SAMPLERS:
            raise SearchError(f"unknown --sampler {self.sampler!r} (choose from {', '.join(SAMPLERS)})")
        if self.coarse_sampler not in COARSE_SAMPLERS:
            raise SearchError(f"unknown --coarse_sampler {self.coarse_sampler!r} (choose from "
                              f"{', '.join(COARSE_SAMPLERS)})")
        if self.pruner not in PRUNERS:
            raise SearchError(f"unknown --pruner {self.pruner!r} (choose from {', '.join(PRUNERS)})")
        if self.coarse_pruner not in PRUNERS:
            raise SearchError(f"unknown --coarse_pruner {self.coarse_pruner!r} (choose from {', '.join(PRUNERS)})")
        if self.n_trials < 1:
            raise SearchError("--n_trials must be at least 1")
        if self.restarts < 1:
            raise SearchError("--restarts must be at least 1")
        if self.budget_evals is not None and self.budget_evals <= 0:
            raise SearchError("--search_budget must be positive")
        if self.reprune_top < 0 or self.select_top < 0:
            raise SearchError("--reprune_top and --select_top must be 0 or more")
        if self.elite_mean < 0 or self.elite_mean == 1:
            raise SearchError(f"--elite_mean {self.elite_mean}: 0 (none) or the number of best trials to average "
                              "(2 or more)")
        if self.elite_mean and (self.n_trials < 2 or (self.budget_evals is not None and self.budget_evals <= 1)):
            raise SearchError("--elite_mean takes the search's last evaluation: it needs --n_trials 2 and a "
                              "--search_budget above 1")
        if self.select_nsamples is not None and self.select_nsamples < 1:
            raise SearchError("--select_nsamples must be at least 1")
        if self.restart_mean and (self.restarts < 2 or self.kind != "sparsity"):
            raise SearchError("--restart_mean averages the restarts' best sparsity allocations: it needs "
                              "--restarts 2 or more and --search sparsity")
        if self.searches_sparsity:
            if self.method not in SEARCH_METHODS:
                raise SearchError(f"a sparsity search needs a calibrated method ({', '.join(SEARCH_METHODS)})")
            if not 0 < self.sparsity_step <= 0.5:
                raise SearchError(f"--sparsity_step {self.sparsity_step} must be in (0, 0.5]")
            if not 0 <= self.sparsity_range < 1:
                raise SearchError(f"--sparsity_range {self.sparsity_range} must be in [0, 1)")
            if 0 < self.sparsity_range + 1e-9 < self.sparsity_step:
                raise SearchError(f"--sparsity_range {self.sparsity_range} is smaller than --sparsity_step "
                                  f"{self.sparsity_step}: the grid would hold the target only")
            if self.granularity in ("trend", "trend_layer") and self.sampler == "evolution":
                raise SearchError(f"--sampler evolution moves integer levels; --search_granularity "
                                  f"{self.granularity} searches a trend's real numbers (use tpe, gp, cmaes or random)")
            if self.granularity == "trend_layer" and self.sampler in ("gp", "cmaes"):
                raise SearchError(f"--sampler {self.sampler} models one fixed set of parameters and "
                                  "--search_granularity trend_layer (the default above a 55% target) changes them "
                                  "between its stages: use tpe or random, or add --search_granularity layer (or "
                                  "trend)")
            if not 0 < self.startup_scale <= 1:
                raise SearchError(f"--startup_scale {self.startup_scale} must be in (0, 1]")
            if not 0 < self.coarse_fraction < 1:
                raise SearchError(f"coarse fraction {self.coarse_fraction} must be in (0, 1)")
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
