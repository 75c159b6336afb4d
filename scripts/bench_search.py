"""Benchmark the layer-wise allocations on a real model, one resumable cell at a time.

Cells (each a JSON file under ``--cells_dir/<model>/``, written when it finishes; an existing cell is never
recomputed, so an interrupted run resumes where it stopped and targets can run one at a time):

* ``dense``; ``uniform-{wanda,optspa,sparsegpt}-s{target}``; ``owl-{wanda,optspa}-s{target}``;
* ``search-{base}-s{target}-{variant}``: the search run as ``main.py --prune_method {base}`` runs it (oneshot
  trials for wanda/optspa, then the shipped model), with the variant's range / unit / sampler / objective.

Every cell reports WikiText-2 *test* perplexity (Wanda's protocol, all windows) and C4 validation perplexity
(held-out documents: with ``--split_c4`` the testbed's C4 sample is split into calibration documents and
validation documents, which never overlap). Searches are scored on WikiText-2 *validation* windows only.

    python scripts/bench_search.py --model ~/.cache/optspa-testbed/smollm2-135m --data_dir ../shared/testbed/data \\
        --split_c4 --targets 0.7 --cells uniform owl search --threads 2
    python scripts/bench_search.py --model ... --publish README.md --profiles_dir profiles   # tables only
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
import time

# the tables are their own module (scripts/ is on the path when this runs as a script, not when it is imported)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_search_tables import (LAYER_SPACE_RANGE, load_cells, markdown, profiles_markdown,  # noqa: E402
                                 replace_section, write_profiles)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

logger = logging.getLogger("bench_search")
# The ablations' base. "default" is the tool's own defaults: its range follows the target
# (lib.search_config.default_sparsity_range; None here), the ablation variants keep +-0.2 unless they say. Up to
# lib.search_config.LOW_TARGET it is the defaults before the trend alone on the uniform pruning's statistics
# became the tool's there (session 41), and above it one search, the defaults before two restarts and their mean
# became the tool's there (session 43): the stored cells keep their names, and the tool's default is
# "default+trend+su" up to LOW_TARGET and "default+x2m" above it (Wanda and Optspa bases; SparseGPT's stays one).
DEFAULT_VARIANT = {"range": 0.2, "granularity": "trend_layer", "sampler": "tpe", "objective": "ppl", "pruner": "median",
                   "trend_types": True, "objective_spread": False, "objective_text": None,
                   "restarts": 1, "restart_mean": False}
VARIANTS = {  # the ablations that choose the defaults
    "default": {"range": None},
    "r0.05": {"range": 0.05}, "r0.1": {"range": 0.1}, "r0.2": {"range": 0.2}, "r0.3": {"range": 0.3},
    "block": {"granularity": "block"}, "block_module": {"granularity": "block_module"},
    "module": {"granularity": "module"}, "layer": {"granularity": "layer"},  # the default before trend_layer
    "trend": {"granularity": "trend"}, "trend_layer": {"granularity": "trend_layer"},  # depth + type offsets
    "trend_depth": {"granularity": "trend", "trend_types": False},  # depth terms only
    "trend_depth_layer": {"granularity": "trend_layer", "trend_types": False},
    "gp": {"sampler": "gp"}, "cmaes": {"sampler": "cmaes"}, "evolution": {"sampler": "evolution"},
    "kl": {"objective": "kl"}, "nopruner": {"pruner": "none"},  # kl: on fresh c4 windows (main.py's default)
    "klw": {"objective": "kl", "objective_text": "wikitext2"},  # kl on the ppl objective's validation windows
    "b200": {"budget": 200},  # the full allowance of evaluations (--budget is the quick protocol's)
    "o16": {"objective_windows": 16},  # 2x the quick protocol's objective windows (less fitting to them)
    "o32": {"objective_windows": 32},
    "spread": {"objective_spread": True},  # the objective windows evenly spaced over the validation split
    "sel": {"select_top": 4},  # the 4 best trials scored again on 4x the objective's windows; the best there ships
    # trend_layer: the trend's share of the evaluations (the tool's default: a quarter up to 50%, half from 60%)
    "c0.25": {"coarse_fraction": 0.25}, "c0.5": {"coarse_fraction": 0.5},
    "c0.75": {"coarse_fraction": 0.75},
    "ccmaes": {"coarse_sampler": "cmaes"},  # trend_layer: CMA-ES from the uniform allocation for the trend stage
    # TPE's ten random start-up draws within half of each range around the uniform allocation (default: all of it);
    # its good start-up makes the median rule stop many trials after one window: room for the whole budget
    "s0.5": {"startup_scale": 0.5, "n_trials": 400},
    # the tool's --pruner auto (the quick protocol asks for median): median in a TPE stage, none in a CMA-ES one
    "auto": {"pruner": "auto"},
    # trials worse than the uniform allocation at the same window stopped, besides the median rule
    # (its stopped trials cost an eighth: room for 400 trials, so the 50-evaluation budget is what binds)
    "baseline": {"pruner": "baseline", "n_trials": 400},
    "running": {"pruner": "running", "n_trials": 400},
    # trend_layer: the baseline rule in the trend stage only, the median rule in the per-layer stage (the baseline
    # rule found better trends at 70% but stopped per-layer trials on one window's noise)
    "cbaseline": {"coarse_pruner": "baseline", "n_trials": 400},
    "seq": {"trial_mode": "sequential"},  # trials pruned layer by layer (SparseGPT's only mode until 7 Dec. 2026)
    "rp4": {"reprune_top": 4},  # the 4 best profiles re-pruned sequentially (default the best one)
    # oneshot trials from the uniform sequential pruning's activations (SparseGPT: its Hessians), not the dense model's
    "su": {"trial_stats": "uniform"},
    # the sampler's seed alone (calibration, objective and everything else as the cell without it): how far the
    # same search lands from itself, the noise every single-cell comparison sits in
    "seed1": {"sampler_seed": 1}, "seed2": {"sampler_seed": 2}, "seed3": {"sampler_seed": 3},
    "seed4": {"sampler_seed": 4},  # with x2m: restarts seeded 4 and 5 (a third pair)
    # --restarts 3 in one run (seeds 0, 1, 2 sharing the setup): its wall time, and the check that it ships what
    # the restarts table reads off the seed cells
    "x3": {"restarts": 3},
    # the budget's last trial scores the mean of the K best trials' parameters (trend_layer: per-layer moves);
    # it ships only if it scores best, like any trial
    "em4": {"elite_mean": 4}, "em8": {"elite_mean": 8},
    # --restarts N --restart_mean: N searches (seeds 0..N-1, the seed cells' trials), then the mean of their best
    # allocations, shipped only if it beats every restart's model on the objective
    "x2m": {"restarts": 2, "restart_mean": True}, "x4m": {"restarts": 4, "restart_mean": True},
}


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (no ties expected: perplexities of distinct models)."""
    def ranks(v):
        r = [0] * len(v)
        for k, i in enumerate(sorted(range(len(v)), key=lambda i: v[i])):
            r[i] = k
        return r

    n = len(xs)
    d2 = sum((a - b) ** 2 for a, b in zip(ranks(xs), ranks(ys)))
    return 1 - 6 * d2 / (n * (n * n - 1))


def variant_settings(name: str) -> dict:
    """A variant's settings over the defaults; ``a+b`` combines variants (``evolution+b200``)."""
    parts = name.split("+")
    unknown = [p for p in parts if p not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variant {unknown[0]!r} (choose from {', '.join(sorted(VARIANTS))}, "
                                         "joined by +)")
    out = dict(DEFAULT_VARIANT)
    for p in sorted(parts, key=lambda p: p != "default"):  # the tool's defaults first, what a variant says over them
        out.update(VARIANTS[p])
    return out


def variant_name(name: str) -> str:
    variant_settings(name)
    return name


def machine(threads: int | None) -> str:
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{threads or torch.get_num_threads()} threads")


def versions() -> dict:
    """The libraries and CPU a cell's numbers depend on: seeded draws move between releases, and float kernels
    between CPUs (a mask sorted from scores flips near-ties)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"cpu": platform.processor() or None}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            out["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                              out["cpu"])
    except OSError:
        pass
    out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # which kernels torch dispatched to
    for pkg in ("torch", "transformers", "optuna", "cmaes", "scipy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def split_c4(data_dir: str, work: str, val_docs: int) -> str:
    """A --data_dir whose c4 train shard is the sample minus its last ``val_docs`` documents and whose
    validation shard is those documents (never used for calibration)."""
    out = os.path.join(work, "data")
    os.makedirs(os.path.join(out, "c4"), exist_ok=True)
    for name in ("wikitext-2-raw-v1", "wikitext-2-v1"):
        if os.path.isdir(os.path.join(data_dir, name)) and not os.path.exists(os.path.join(out, name)):
            os.symlink(os.path.abspath(os.path.join(data_dir, name)), os.path.join(out, name))
    src = sorted(glob.glob(os.path.join(data_dir, "c4", "*.json*")))[0]
    lines = [line for line in open(src, encoding="utf-8") if line.strip()]
    with open(os.path.join(out, "c4", "c4-train.sample.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(lines[:-val_docs])
    with open(os.path.join(out, "c4", "c4-validation.sample.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(lines[-val_docs:])
    return out


def take_lock(lock: str) -> bool:
    """Create ``lock`` holding this host and pid; a lock left by a dead process of this host (a killed runner)
    is taken over, so an interrupted cell is measured again by the next run instead of skipped for ever."""
    me = f"{platform.node()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                host, pid = open(lock, encoding="utf-8").read().split()
                if host != platform.node():
                    return False  # another machine's runner: not ours to judge
                os.kill(int(pid), 0)
                return False  # alive
            except ProcessLookupError:
                logger.info("%s: its runner (pid %s) is gone; taking the cell over", lock, pid)
                os.remove(lock)
                continue
            except (OSError, ValueError):  # unreadable, or an old empty lock: leave it to its owner
                return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(me)
        return True
    return False


C4_VAL_DOCS = 380  # held-out C4 documents with --split_c4


def cell_path(cells_dir: str, tag: str, name: str) -> str:
    return os.path.join(cells_dir, tag, f"{name}.json")


def search_cell(method: str, target: float, variant: str) -> str:
    return f"search-{method}-s{target:.2f}-{variant}"


def check_profiles_from(args, tag: str, source: str | None = None, flag: str = "--profiles_from") -> str | None:
    """What is wrong with the search cells to rebuild from ``source`` (default ``--profiles_from``); None: every
    source cell exists, holds its shipped profile and was calibrated as this run will be, so its shipped model
    can be rebuilt."""
    for t in args.targets:
        for variant in args.variants:
            for m in args.methods:
                path = cell_path(source or args.profiles_from, tag, search_cell(m, t, variant))
                if not os.path.exists(path):
                    return f"{flag}: no cell {path} (measure it first)"
                try:
                    src = json.load(open(path, encoding="utf-8"))
                except (OSError, ValueError) as e:
                    return f"{flag}: cannot read {path}: {e}"
                if "profile" not in src:
                    return f"{flag}: {path} holds no shipped profile (a cell from before profiles were stored)"
                theirs = stored_calibration(src)
                ours = calibration_of(args, args.seqlen)
                differ = [k for k in ours if theirs.get(k) != ours[k]]
                if differ:
                    return (f"{flag}: {path} drew its calibration with other settings ("
                            + ", ".join(f"{k} {theirs.get(k)} here {ours[k]}" for k in differ)
                            + "): its model cannot be rebuilt")
    return None


def stored_calibration(cell: dict) -> dict:
    """A cell's :func:`calibration_of`; cells from before it was stored: from their count and command."""
    if cell.get("calibration"):
        return cell["calibration"]
    command = cell.get("command", "")
    split = "--split_c4" in command
    docs = re.search(r"--c4_val_docs[ =](\d+)", command)
    return {"nsamples": cell.get("nsamples"), "seqlen": cell.get("seqlen"),
            "seed": (cell["profile"].get("meta") or {}).get("seed"), "split_c4": split,
            "c4_val_docs": (int(docs[1]) if docs else C4_VAL_DOCS) if split else None}


def calibration_of(args, seqlen: int | None) -> dict:
    """The settings that draw a cell's calibration windows (the held-out C4 documents change them too)."""
    return {"nsamples": args.nsamples, "seqlen": seqlen, "seed": args.seed, "split_c4": bool(args.split_c4),
            "c4_val_docs": args.c4_val_docs if args.split_c4 else None}


class Bench:
    def __init__(self, args):
        from lib import data
        from lib.models import default_seqlen, load_model
        from lib.oneshot import DenseSnapshot

        self.args = args
        self.tag = os.path.basename(os.path.normpath(args.model))
        self.dir = os.path.join(args.cells_dir, self.tag)
        os.makedirs(self.dir, exist_ok=True)
        self.work = tempfile.mkdtemp(prefix="bench-search-")
        self.data_dir = split_c4(args.data_dir, self.work, args.c4_val_docs) if args.split_c4 else args.data_dir
        lm = load_model(args.model, dtype="float32")
        self.model, self.tok = lm.model, lm.tokenizer
        self.seqlen = default_seqlen(self.model, args.seqlen)
        self.snapshot = DenseSnapshot(self.model)
        self.test_ids = data.get_eval_tokens("wikitext2", self.tok, self.data_dir, "test", self.seqlen)
        self.c4_ids = data.get_eval_tokens("c4", self.tok, self.data_dir, "validation", self.seqlen)
        self.val_ids = data.get_eval_tokens("wikitext2", self.tok, self.data_dir, "validation", self.seqlen)
        self.calib = data.get_calibration("c4", self.tok, args.nsamples, args.seed, self.seqlen, self.data_dir)

    def kl_tokens(self, windows: int):
        """The KL objective's calibration-set windows (fresh ones: seeded apart from the calibration's)."""
        import torch
        from lib import data

        return torch.cat(data.get_calibration("c4", self.tok, windows, self.args.seed + 1, self.seqlen,
                                              self.data_dir), dim=1)

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def cell(self, name: str, fn) -> dict:
        path = cell_path(self.args.cells_dir, self.tag, name)
        if os.path.exists(path):
            return json.load(open(path, encoding="utf-8"))
        if not take_lock(path + ".lock"):  # several runners may share the cells: one measures a cell
            logger.info("cell %s is being measured by another runner; skipped", name)
            return {}
        try:
            return self._measure(name, path, fn)
        finally:
            os.remove(path + ".lock")

    def _measure(self, name: str, path: str, fn) -> dict:
        from lib.io import write_json

        logger.info("cell %s", name)
        self.snapshot.restore()
        self.kv = None  # the KV quantization the evaluation simulates (set by KV cells)
        t0 = time.perf_counter()
        res = fn()
        res.update({"cell": name, "seconds": time.perf_counter() - t0, "machine": machine(self.args.threads),
                    "versions": versions(),
                    "nsamples": self.args.nsamples, "seqlen": self.seqlen,
                    "calibration": calibration_of(self.args, self.seqlen)})
        if not res.pop("skip_eval", False):
            res.update(self.evaluate())
            logger.info("cell %s: wikitext2 test %.3f, c4 val %.3f", name, res["wikitext2_test"], res["c4_val"])
        write_json(path, res)
        return res

    def evaluate(self) -> dict:
        from lib.kvquant import simulate_kv_quant

        with simulate_kv_quant(self.model, self.kv):
            return self._evaluate()

    def _evaluate(self) -> dict:
        from lib.eval import eval_ppl
        from lib.prune import check_sparsity

        total = self.test_ids.numel() // self.seqlen
        return {"wikitext2_test": eval_ppl(self.model, self.test_ids, self.seqlen, desc="wikitext2 test",
                                           max_windows=self.args.test_windows),
                "test_windows": min(total, self.args.test_windows or total), "test_windows_total": total,
                "c4_val": eval_ppl(self.model, self.c4_ids, self.seqlen, desc="c4 val",
                                   max_windows=self.args.c4_windows),
                "c4_windows": min(self.args.c4_windows, self.c4_ids.numel() // self.seqlen),
                "actual_sparsity": check_sparsity(self.model)[0]}

    def prune(self, method: str, profile) -> dict:
        from lib.prune import prune_magnitude, prune_optspa, prune_sparsegpt, prune_wanda
        from lib.sparsity import SparsityType

        pat = SparsityType()
        fn = {"wanda": prune_wanda, "optspa": prune_optspa, "sparsegpt": prune_sparsegpt}.get(method)
        res = prune_magnitude(self.model, profile, pat) if fn is None else fn(self.model, self.calib, profile, pat)
        return {"calib_seconds": res.calib_seconds, "prune_seconds": res.prune_seconds}

    def uniform(self, method: str, target: float) -> dict:
        from lib.models import decoder_layers
        from lib.profile import Profile

        return {"allocation": "uniform", "method": method, "target": target,
                **self.prune(method, Profile.uniform(len(decoder_layers(self.model)), target))}

    def owl(self, method: str, target: float) -> dict:
        from lib.oneshot import input_stats
        from lib.owl import DEFAULT_LAMBDA, DEFAULT_M, owl_profile

        prof = owl_profile(self.model, input_stats(self.model, self.calib, "cpu"), target)
        self.snapshot.restore()
        return {"allocation": "owl", "method": method, "target": target, "owl_lambda": DEFAULT_LAMBDA,
                "owl_m": DEFAULT_M, "layer_sparsity": prof.sparsity, **self.prune(method, prof)}

    def search(self, method: str, target: float, variant: str) -> dict:
        if self.args.profiles_from:
            return self.searched_profile(method, target, variant)
        return self.run_search(method, target, variant)

    def searched_profile(self, method: str, target: float, variant: str, source: str | None = None) -> dict:
        """A search cell measured in ``source`` (default ``--profiles_from``): its shipped profile pruned again as
        it shipped (oneshot or sequential, on the same calibration windows), no search. How a cheap protocol's
        searches are scored on a costlier one (the full test set) without searching again."""
        from lib.objective import Objective
        from lib.oneshot import prune_oneshot, shipped_oneshot
        from lib.profile import Profile

        path = cell_path(source or self.args.profiles_from, self.tag, search_cell(method, target, variant))
        src = json.load(open(path, encoding="utf-8"))  # checked by check_profiles_from before any work
        prof = Profile.from_dict(src["profile"])
        # the rebuilt model must be the one the search shipped: scored again on the search objective (a kl judge
        # stores the dense model's distribution, so it is built before pruning)
        n = src["search"].get("selection_windows") or src["search"]["objective_windows"]  # what shipped_value read
        judge = Objective(self.model, self.search_tokens(src, n), self.seqlen, n, "cpu", False,
                          kind=src.get("objective", "ppl"), workdir=self.work)
        if shipped_oneshot(prof, method):
            res = prune_oneshot(self.model, self.calib, prof, method, "cpu")
            timing = {"calib_seconds": res.calib_seconds, "prune_seconds": res.prune_seconds}
        else:
            timing = self.prune(method, prof)
        rebuilt = judge()
        judge.close()
        if rebuilt != src["search"]["shipped_value"]:
            logger.warning("%s: the rebuilt model scores %.6f on the search objective, the shipped one %.6f",
                           path, rebuilt, src["search"]["shipped_value"])
        # everything the source cell says about its search (a setting added later is carried too); what this
        # cell measures again (test sets, sparsity, machine, timings) the caller writes over it
        settings = {k: v for k, v in src.items() if k != "trials_csv"}  # the CSV lies beside the source cell
        return {**settings, **timing, "profile_from": path, "rebuilt_value": rebuilt,
                "source_wikitext2_test": src["wikitext2_test"], "source_test_windows": src["test_windows"]}

    def run_search(self, method: str, target: float, variant: str) -> dict:
        from lib.search import run_search
        from lib.search_config import SearchConfig, selection_nsamples

        v = variant_settings(variant)
        a = self.args
        budget = v.pop("budget", a.budget)
        windows = v.pop("objective_windows", a.objective_nsamples)
        select_top = v.pop("select_top", 0)
        reprune_top = v.pop("reprune_top", a.reprune_top)
        sampler_seed = v.pop("sampler_seed", a.seed)
        trial_mode = v.pop("trial_mode", "oneshot")
        trial_stats = v.pop("trial_stats", "dense")
        # else SearchConfig's
        tool_keys = ("coarse_fraction", "coarse_sampler", "coarse_pruner", "startup_scale", "restarts",
                     "restart_mean", "elite_mean")
        tool_defaults = {k: v.pop(k) for k in tool_keys if k in v}
        # stopped trials cost a fraction: room for the whole budget
        n_trials = max(v.pop("n_trials", a.n_trials), 2 * budget)
        num_layers = self.model.config.num_hidden_layers
        cfg = SearchConfig(target=target, kind="sparsity", granularity=v["granularity"],
                           num_blocks=min(8, max(1, num_layers // 2)), sparsity_range=v["range"],
                           n_trials=n_trials, budget_evals=budget, seed=sampler_seed, method=method,
                           sampler=v["sampler"], pruner=v["pruner"], reprune_top=reprune_top,
                           select_top=select_top, objective=v["objective"], trend_types=v["trend_types"],
                           save_dir=os.path.join(a.study_dir or self.work, f"{method}-{target}-{variant}"),
                           trial_mode=trial_mode, trial_stats=trial_stats, **tool_defaults)
        v["range"] = cfg.sparsity_range  # "default" leaves it to the tool (it follows the target): record what ran

        def tokens(n: int):
            return self.search_tokens(v, n)

        r = run_search(self.model, cfg, calib=self.calib, objective_ids=tokens(windows), seqlen=self.seqlen,
                       objective_nsamples=windows, model_name=self.tag, progress=False,
                       selection_ids=tokens(selection_nsamples(None, windows)) if select_top else None)
        # every trial beside the cell, for anyone who wants the search's history, not only its winner
        trials_csv = cell_path(a.cells_dir, self.tag, search_cell(method, target, variant))[:-5] + ".trials.csv"
        shutil.copyfile(r.files["trials"], trials_csv)
        complete = [t for t in r.trials if t["state"] == "COMPLETE"]
        secs = [t["trial_seconds"] for t in complete if t["trial_seconds"] and t["windows"]]
        evals = [t["eval_seconds"] for t in complete if t["eval_seconds"] and t["windows"]]
        uniform_val = next((t["value"] for t in r.trials if t["number"] == 0), None)
        out = {"allocation": "search", "method": method, "target": target, "variant": variant, **v,
               "select_top": select_top, "reprune_top": reprune_top, "coarse_fraction": cfg.coarse_fraction,
               "coarse_sampler": cfg.coarse_sampler if cfg.granularity == "trend_layer" else None,
               "coarse_pruner": cfg.coarse_pruner if cfg.granularity == "trend_layer" else None,
               "sampler_seed": sampler_seed, "trial_mode": trial_mode, "trial_stats": trial_stats,
               "startup_scale": cfg.startup_scale,
               "restarts": cfg.restarts, "elite_mean": cfg.elite_mean, "restart_mean": cfg.restart_mean,
               "search": {**r.summary(), "seconds": r.seconds, "trials": len(r.trials),
                          "objective_windows": windows, "uniform_value": uniform_val,
                          "s_per_trial": sum(secs) / len(secs) if secs else None,
                          "s_per_eval": sum(evals) / len(evals) if evals else None},
               "layer_sparsity": r.profile.sparsity,
               "profile": r.profile.to_dict(),  # the shipped allocation in full: --publish ships it
               "command": " ".join(["python", *sys.argv]), "trials_csv": os.path.basename(trials_csv)}
        return out

    def search_tokens(self, v: dict, n: int):
        """A variant's objective text: fresh c4 windows for kl (main.py's default), else the validation windows."""
        if v["objective"] == "kl" and v.get("objective_text") != "wikitext2":
            return self.kl_tokens(n)
        return self.objective_ids(n, v.get("objective_spread", False))

    def objective_ids(self, n: int, spread: bool):
        """The search objective's validation tokens: the first ``n`` windows (main.py's default), or ``n`` spread
        over the split (``--objective_windows spread``)."""
        from lib.eval import spread_windows

        return spread_windows(self.val_ids, self.seqlen, n) if spread else self.val_ids

    def rank_agreement(self, method: str, target: float, n: int) -> dict:
        """Oneshot vs sequential ranking: ``n`` random feasible allocations of the default space, each scored
        on the search objective pruned oneshot (as trials are: from the dense model's statistics, and from the
        uniform sequential pruning's, ``--trial_stats uniform``) and sequentially (as a re-prune is)."""
        import random

        from lib.objective import Objective
        from lib.oneshot import oneshot_pruner
        from lib.search_config import SearchConfig
        from lib.search_space import SearchSpace, module_shapes, profile_counts, realized_profile
        from lib.trials import prune_sequential

        shapes = module_shapes(self.model)
        space = SearchSpace(SearchConfig(target=target, granularity="layer", sparsity_range=LAYER_SPACE_RANGE),
                            shapes,
                            self.model.config.num_hidden_layers)
        rng = random.Random(self.args.seed)
        allocs = [space.allocation(None)] + [
            space.allocation([rng.randint(lo, hi) for lo, hi in zip(space.lo, space.hi)]) for _ in range(n - 1)]
        obj = Objective(self.model, self.val_ids, self.seqlen, self.args.objective_nsamples, "cpu", False)
        calib = self.calib[: self.args.rank_nsamples or len(self.calib)]  # both rankings see the same windows
        profiles = [realized_profile(self.model, a.unit_ratio, target) for a in allocs]

        def oneshot(pruned_at):  # trials' statistics from the dense model or the uniform sequential pruning
            self.snapshot.restore()
            pruner = oneshot_pruner(self.model, calib, method, space.count_bounds(), "cpu", dense=self.snapshot,
                                    pruned_at=pruned_at)
            values = []
            for prof in profiles:
                pruner.apply(profile_counts(prof, shapes))
                values.append(obj())
            return values

        dense_stats, uniform_stats = oneshot(None), oneshot(target)
        sequential = []
        for prof in profiles:
            self.snapshot.restore()
            prune_sequential(method, self.model, calib, prof, "cpu", False)
            sequential.append(obj())
        self.snapshot.restore()  # the cell's evaluation then scores the dense model; not a pruned row
        return {"allocation": "rank", "method": method, "target": target, "profiles": n, "calib_windows": len(calib),
                "oneshot": dense_stats, "sequential": sequential, "spearman": spearman(dense_stats, sequential),
                "oneshot_uniform_stats": uniform_stats, "spearman_uniform_stats": spearman(uniform_stats, sequential),
                "skip_eval": True}

    # ------------------------------------------------------------------ KV bits (dense or pruned weights)
    def kv_cfg(self, key_bits: list[int], value_bits: list[int]):
        from lib.kvquant import KVQuantConfig

        group = {} if self.args.kv_group_size is None else {"group_size": self.args.kv_group_size}
        return KVQuantConfig(key_bits=list(key_bits), value_bits=list(value_bits), **group)

    def kv_uniform(self, bits: int) -> dict:
        n = self.model.config.num_hidden_layers
        self.kv = self.kv_cfg([bits] * n, [bits] * n)
        return {"allocation": "kv-uniform", "method": "dense", "target": 0.0, "kv_avg_bits": float(bits),
                "key_bits": self.kv.key_bits, "value_bits": self.kv.value_bits}

    def kv_two_level(self, lo: int, hi: int) -> dict:
        """The best two-level split at the budget (lo + hi) / 2, chosen on the search objective (validation)."""
        from lib.kvquant import simulate_kv_quant
        from lib.objective import Objective

        n = self.model.config.num_hidden_layers
        half = n // 2
        splits = {"K hi / V lo": ([hi] * n, [lo] * n), "K lo / V hi": ([lo] * n, [hi] * n),
                  "first half hi": ([hi] * half + [lo] * (n - half),) * 2,
                  "second half hi": ([lo] * half + [hi] * (n - half),) * 2}
        obj = Objective(self.model, self.val_ids, self.seqlen, self.args.objective_nsamples, "cpu", False)
        scores = {}
        for name, (k, v) in splits.items():
            with simulate_kv_quant(self.model, self.kv_cfg(k, v)):
                scores[name] = obj()
        best = min(scores, key=scores.get)
        self.kv = self.kv_cfg(*splits[best])
        return {"allocation": "kv-two-level", "method": "dense", "target": 0.0, "kv_avg_bits": (lo + hi) / 2,
                "split": best, "validation": scores, "key_bits": self.kv.key_bits, "value_bits": self.kv.value_bits}

    def kv_after_search(self, method: str, target: float, variant: str, bits: int) -> dict:
        """The sparsity-only search's shipped model (rebuilt from its cell in this cells dir) under a uniform KV
        cache of ``bits``: what the joint search must beat at that KV budget."""
        out = self.searched_profile(method, target, variant, source=self.args.cells_dir)
        n = self.model.config.num_hidden_layers
        self.kv = self.kv_cfg([bits] * n, [bits] * n)
        return {**out, "allocation": "kv-after-search", "kv_avg_bits": float(bits), "key_bits": self.kv.key_bits,
                "value_bits": self.kv.value_bits}

    def kv_search(self, method: str, target: float, avg: float, choices: list[int]) -> dict:
        from lib.search import run_search
        from lib.search_config import SearchConfig

        a = self.args
        kind = "kv" if target == 0 else "joint"
        cfg = SearchConfig(target=target, kind=kind, granularity="layer", sparsity_range=LAYER_SPACE_RANGE,
                           kv_bits_choices=tuple(choices), kv_avg_bits=avg, kv_separate=True, n_trials=a.n_trials,
                           budget_evals=a.budget, seed=a.seed, method=method, reprune_top=a.reprune_top,
                           save_dir=os.path.join(self.work, f"{kind}-{method}-{target}-{avg}"))
        r = run_search(self.model, cfg, calib=self.calib, objective_ids=self.val_ids, seqlen=self.seqlen,
                       objective_nsamples=a.objective_nsamples, model_name=self.tag, progress=False,
                       kv_kwargs=None if a.kv_group_size is None else {"group_size": a.kv_group_size})
        self.kv = self.kv_cfg(r.profile.key_bits, r.profile.value_bits)
        return {"allocation": f"{kind}-search", "method": method if kind == "joint" else "dense", "target": target,
                "kv_avg_bits": avg, "kv_choices": choices, "key_bits": r.profile.key_bits,
                "value_bits": r.profile.value_bits, "layer_sparsity": r.profile.sparsity,
                "search": {**r.summary(), "seconds": r.seconds, "trials": len(r.trials),
                           "objective_windows": a.objective_nsamples, "s_per_eval": None}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data_dir", default=os.path.join(ROOT, "..", "shared", "testbed", "data"))
    p.add_argument("--cells_dir", default=os.path.join(ROOT, "scripts", "results", "search"))
    p.add_argument("--split_c4", action="store_true", help="hold out the last --c4_val_docs c4 documents")
    p.add_argument("--c4_val_docs", type=int, default=C4_VAL_DOCS)
    p.add_argument("--c4_windows", type=int, default=64, help="C4 validation windows scored (Wanda: 256)")
    p.add_argument("--test_windows", type=int, default=None,
                   help="score only the first N WikiText-2 test windows (default: all; the table says how many)")
    p.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.6, 0.5])
    p.add_argument("--cells", nargs="+", default=["dense", "uniform", "owl", "search"])
    p.add_argument("--methods", nargs="+", default=["optspa", "wanda"], help="bases of uniform/OWL/search cells")
    p.add_argument("--uniform_methods", nargs="+", default=["optspa", "wanda", "sparsegpt"])
    p.add_argument("--variants", nargs="+", default=["default"], type=variant_name,
                   help=f"search cells: {', '.join(sorted(VARIANTS))}, or several joined by + (evolution+b200)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--objective_nsamples", type=int, default=16)
    p.add_argument("--n_trials", type=int, default=200)
    p.add_argument("--budget", type=float, default=150.0, help="full objective evaluations per search")
    p.add_argument("--reprune_top", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rank_profiles", type=int, default=20, help="rank cells: profiles scored both ways")
    p.add_argument("--rank_nsamples", type=int, default=None,
                   help="rank cells: calibration windows for both prunings (default: all --nsamples)")
    p.add_argument("--kv_avg", type=float, default=3.0, help="KV cells: average bits (keys and values)")
    p.add_argument("--kv_choices", type=int, nargs="+", default=[2, 3, 4, 6, 8])
    p.add_argument("--kv_group_size", type=int, default=None,
                   help="KV cells: elements per quantization group along the head (default: the tool's)")
    p.add_argument("--profiles_dir", default=None,
                   help="with --publish: ship the --ship_variants search cells' profiles here, and their table")
    p.add_argument("--ship_variants", nargs="+", default=["default"], type=variant_name,
                   help="the search cells whose profiles are shipped (default: main.py's default settings; "
                        "others get their settings in the file name)")
    p.add_argument("--study_dir", default=None,
                   help="keep the search cells' Optuna studies here (default: a temporary folder), so a killed "
                        "run resumes its searches where they stopped")
    p.add_argument("--profiles_from", default=None,
                   help="search cells: rebuild the shipped model of the same cell measured in this cells dir "
                        "(same calibration) and score it here, without searching (the full test set)")
    p.add_argument("--section", default=None,
                   help="with --publish: the marked section to replace (default: bench_search_<model>)")
    p.add_argument("--publish", default=None, help="write the table into this markdown file and exit")
    args = p.parse_args()
    tag = os.path.basename(os.path.normpath(args.model))
    if args.publish:
        cells = load_cells(args.cells_dir, tag)
        replace_section(args.publish, markdown(cells, tag), args.section or f"bench_search_{tag}")
        if args.profiles_dir:
            for path in write_profiles(cells, tag, args.profiles_dir, args.ship_variants):
                logger.info("shipped %s", path)
            replace_section(os.path.join(args.profiles_dir, "README.md"),
                            profiles_markdown(args.profiles_dir, args.cells_dir), "profiles")
        return 0
    # (unless this run measures those search cells first)
    if "kvafter" in args.cells and "search" not in args.cells:
        problem = check_profiles_from(args, tag, args.cells_dir, "--cells kvafter")
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    if args.profiles_from and "search" in args.cells:
        problem = check_profiles_from(args, tag)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    for noisy in ("transformers", "lib.eval"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args)
    try:
        if "dense" in args.cells:
            bench.cell("dense", lambda: {"allocation": "dense", "method": "dense", "target": 0.0})
        for t in args.targets:
            if "uniform" in args.cells:
                for m in args.uniform_methods:
                    bench.cell(f"uniform-{m}-s{t:.2f}", lambda m=m: bench.uniform(m, t))
            if "owl" in args.cells:
                for m in args.methods:
                    bench.cell(f"owl-{m}-s{t:.2f}", lambda m=m: bench.owl(m, t))
            if "search" in args.cells:
                for variant in args.variants:
                    for m in args.methods:
                        bench.cell(search_cell(m, t, variant), lambda m=m, v=variant: bench.search(m, t, v))
        if "rank" in args.cells:
            for t in args.targets:
                for m in args.methods:
                    bench.cell(f"rank-{m}-s{t:.2f}-n{args.rank_profiles}",
                               lambda m=m, t=t: bench.rank_agreement(m, t, args.rank_profiles))
        if "kv" in args.cells:  # KV bits where allocation matters: average args.kv_avg over the choices
            lo, hi = int(args.kv_avg) - 1, int(args.kv_avg) + 1
            bench.cell(f"kv-uniform{int(args.kv_avg)}", lambda: bench.kv_uniform(int(args.kv_avg)))
            bench.cell(f"kv-two-level{lo}-{hi}", lambda: bench.kv_two_level(lo, hi))
            bench.cell(f"kv-search-avg{args.kv_avg:g}", lambda: bench.kv_search("dense", 0.0, args.kv_avg,
                                                                                args.kv_choices))
        if "kvafter" in args.cells:  # the searched sparsity profile, then a uniform KV cache of --kv_avg bits
            for t in args.targets:
                for variant in args.variants:
                    for m in args.methods:
                        bench.cell(f"kvafter-{search_cell(m, t, variant)}-kv{int(args.kv_avg)}",
                                   lambda m=m, t=t, v=variant: bench.kv_after_search(m, t, v, int(args.kv_avg)))
        if "joint" in args.cells:
            for t in args.targets:
                for m in args.methods:
                    bench.cell(f"joint-{m}-s{t:.2f}-kv{args.kv_avg:g}",
                               lambda m=m, t=t: bench.kv_search(m, t, args.kv_avg, args.kv_choices))
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
