"""Where a search study lives: Optuna storages (RDB with heartbeats, or a journal file), the study's name,
and the fingerprints that keep a resumed or shared study from mixing incomparable trials."""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .search_config import LOW_TARGET, SearchConfig, SearchError, low_target


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
                        calib: list[torch.Tensor] | None, kv_kwargs: dict[str, Any] | None,
                        trial_kv: Any = None) -> str:
    """What a trial's value depends on besides its parameters: the objective windows actually scored, the
    calibration windows, the KV quantizer settings (and fixed KV bits of a sparsity search) and the weights'
    dtype. A study refuses trials scored
    on anything else, so a resumed or shared study never mixes values that are not comparable."""
    h = hashlib.sha256()
    if isinstance(objective_ids, (list, tuple)):  # image-text windows: their tokens and pixels
        nwin = min(objective_nsamples, len(objective_ids))
        for w in objective_ids[:nwin]:
            h.update(w.contiguous().cpu().numpy().tobytes())
            for v in (getattr(w, "mm_inputs", None) or {}).values():
                if isinstance(v, torch.Tensor):
                    h.update(v.detach().float().contiguous().cpu().numpy().tobytes())
    else:
        nwin = max(0, min(objective_nsamples, objective_ids.numel() // seqlen))
        h.update(objective_ids[:, : nwin * seqlen].contiguous().cpu().numpy().tobytes())
    for window in calib or []:
        h.update(window.contiguous().cpu().numpy().tobytes())
    dtype = next(model.parameters()).dtype
    h.update(json.dumps({"seqlen": seqlen, "windows": nwin, "calib": len(calib or []), "kv": kv_kwargs or {},
                         "dtype": str(dtype), "trial_kv": trial_kv}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def default_study_name(cfg: SearchConfig, model_name: str) -> str:
    base = os.path.basename(os.path.normpath(model_name)) or model_name
    name = f"optspa-{base}-{cfg.kind}-{cfg.granularity}-s{cfg.target:.2f}"
    if cfg.searches_sparsity and cfg.method != "optspa":
        name += f"-{cfg.method}"
    if cfg.searches_kv:
        name += f"-kv{cfg.kv_budget:g}"
    return name


def restart_study_name(name: str, index: int) -> str:
    """Restart 0 is the study itself (a run without restarts resumes as one of them); the others get a suffix."""
    return name if index == 0 else f"{name}-restart{index}"


def open_study(cfg: SearchConfig, name: str, url: str, space_fingerprint: str, scoring: str, model_name: str,
               sampler, pruner):
    """Create or load the study and refuse one made with another space, model or scoring data."""
    import logging

    import optuna

    log = logging.getLogger(__name__)
    storage = open_storage(url, cfg.heartbeat_seconds)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own log line per trial says more
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                direction="minimize", load_if_exists=True)
    where = url.split("@")[-1]
    have = study.user_attrs.get("space")
    if have is not None and have != space_fingerprint:
        hint = _default_hint(cfg, study.user_attrs)
        raise SearchError(f"study '{name}' in {where} was created with other search settings or another model's "
                          f"module shapes{hint}; pass another --study_name")
    have_scoring = study.user_attrs.get("scoring")
    if have_scoring is not None and have_scoring != scoring:
        raise SearchError(f"study '{name}' in {where} was scored on other data (objective windows, calibration, "
                          "KV settings or dtype); use the same flags or another --study_name")
    if have_scoring is None:
        if study.trials:
            log.warning("study '%s' does not record what its trials were scored on; assuming the same data", name)
        study.set_user_attr("scoring", scoring)
    if have is None:
        _note_old_default_study(cfg, name, model_name, storage, log)
        study.set_user_attr("space", space_fingerprint)
        study.set_user_attr("target_sparsity", cfg.target)
        study.set_user_attr("model", model_name)
        study.set_user_attr("search", cfg.kind)
        study.set_user_attr("method", cfg.method)
        if cfg.searches_sparsity:
            study.set_user_attr("sparsity_range", cfg.sparsity_range)
            study.set_user_attr("trial_mode", cfg.trial_mode)
            study.set_user_attr("granularity", cfg.granularity)
            study.set_user_attr("trial_stats", cfg.trial_stats)
            if cfg.granularity == "trend_layer":
                study.set_user_attr("coarse_fraction", cfg.coarse_fraction)
    return study


def _note_old_default_study(cfg: SearchConfig, name: str, model_name: str, storage, log) -> None:
    """A new default-named study up to LOW_TARGET: say so when the storage holds the one the same command made
    before the default became the trend alone (its name says trend_layer), so a resume is not silently a restart."""
    import optuna

    if cfg.study_name is not None or cfg.granularity != "trend" or not low_target(cfg.target):
        return
    # the name the same command got under the earlier default, from the one naming rule (restarts keep their suffix)
    new_base = default_study_name(cfg, model_name)
    old = default_study_name(replace(cfg, granularity="trend_layer"), model_name) + name[len(new_base):]
    if name.startswith(new_base) and old in optuna.get_all_study_names(storage):
        log.warning("starting study '%s'; the storage holds '%s', made under the earlier default: pass "
                    "--search_granularity trend_layer --trial_stats dense to resume that one", name, old)


def _default_hint(cfg: SearchConfig, attrs: dict) -> str:
    """Why a study made under older defaults no longer matches (the range and the trend's share follow the
    target now), and the flag that resumes it."""
    if not cfg.searches_sparsity:
        return ""
    theirs = attrs.get("trial_mode")
    if cfg.method == "sparsegpt" and cfg.trial_mode == "oneshot" and theirs in (None, "sequential"):
        return (" (SparseGPT's trials were sequential before oneshot became the default: pass --trial_mode "
                "sequential to resume it)")
    theirs = attrs.get("sparsity_range")
    if theirs is not None and theirs != cfg.sparsity_range:
        return (f" (it searched +-{theirs:g}, this run +-{cfg.sparsity_range:g}: the default range grows with the "
                f"target; pass --sparsity_range {theirs:g} to resume it)")
    # trend_layer studies record their share; dense statistics left no mark before they were recorded
    old_default = attrs.get("coarse_fraction") is not None and attrs.get("trial_stats", "dense") == "dense"
    this_run = (cfg.granularity, cfg.trial_stats)
    if old_default and low_target(cfg.target) and this_run != ("trend_layer", "dense"):
        return (f" (it searched trend_layer units on the dense model's statistics, the default up to a "
                f"{LOW_TARGET:g} target before the trend alone on the uniform pruning's became it; pass "
                "--search_granularity trend_layer --trial_stats dense to resume it)")
    if cfg.granularity != "trend_layer":
        return ""
    theirs = attrs.get("coarse_fraction")
    if theirs is not None and theirs != cfg.coarse_fraction:
        return (f" (it spent {theirs:g} of its evaluations on the trend, this run {cfg.coarse_fraction:g}: the "
                f"default share follows the target; pass --coarse_fraction {theirs:g} to resume it)")
    if theirs is None and cfg.coarse_fraction != 0.25:  # made before the share was recorded or followed the target
        return (f" (this run spends {cfg.coarse_fraction:g} of its evaluations on the trend; studies made before "
                "the default share followed the target spent 0.25: pass --coarse_fraction 0.25 to resume one)")
    return ""
