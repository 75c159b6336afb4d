"""Optspa command line: prune (and evaluate) LLaMA-family and LLaVA models, Wanda-compatible flags.

    python main.py --model meta-llama/Llama-2-7b-hf --prune_method wanda \
        --sparsity_ratio 0.5 --sparsity_type unstructured --save out/llama_7b/unstructured/wanda/

This is the only module that knows about flags; everything under lib/ takes plain arguments.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("optspa")

EXIT_BAD_INPUT = 2


class UsageError(Exception):
    """Bad input found by main.py itself; reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    from lib.prune import METHODS
    from lib.samplers import COARSE_SAMPLERS, PRUNERS, SAMPLERS
    from lib.search_config import DEFAULT_GRANULARITY, GRANULARITIES, LOW_TARGET, SearchConfig

    p = _Parser(prog="main.py", description="Post-training pruning and KV-cache compression for LLaMA/LLaVA models.")
    p.add_argument("--model", required=True, help="hub id or local directory (LLaMA-family causal LM, LLaVA-1.5/1.6)")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration sampling (default 0)")
    p.add_argument("--nsamples", type=int, default=128, help="number of calibration windows (default 128)")
    p.add_argument("--sparsity_ratio", type=float, default=None,
                   help="fraction of decoder-linear weights to prune, in [0, 1); N:M implies N/M")
    p.add_argument("--sparsity_type", default="unstructured",
                   help="'unstructured' or N:M, pruning N of every M consecutive inputs (2:4, 4:8, ...)")
    p.add_argument("--prune_method", default="dense", choices=METHODS, help="pruning method (default dense)")
    p.add_argument("--cache_dir", default="llm_weights", help="hub download cache (default llm_weights)")
    p.add_argument("--use_variant", action="store_true", help="Wanda's variant: per-row alpha search (unstructured)")
    p.add_argument("--save", default=None, help="output directory for the log, masks and profile (created)")
    p.add_argument("--save_model", default=None, help="directory to write the pruned model with save_pretrained")
    p.add_argument("--eval_zero_shot", action="store_true", help="also run lm-eval-harness zero-shot tasks")
    p.add_argument("--calib_dataset", default="c4",
                   help="calibration data: c4 (default), wikitext2, or image-text conversations in LLaVA's format "
                        "for LLaVA models: llava_instruct, llava_pretrain or a .json/.jsonl file (with --image_dir)")
    p.add_argument("--data_dir", default=None,
                   help="local dataset files for offline nodes (wikitext-2-raw-v1/, c4/); default: the hub")
    p.add_argument("--seqlen", type=int, default=None,
                   help="calibration/eval window; default max_position_embeddings capped at 4096")
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="weights dtype (default: float16 on GPU, float32 on CPU)")
    p.add_argument("--offload", default="auto", choices=["auto", "on", "off"],
                   help="keep weights on the CPU, one decoder layer on the device at a time (auto: when the "
                        "model would not fit)")
    p.add_argument("--masks", default=None, help="reapply saved masks (folder or masks.json) instead of pruning")
    p.add_argument("--sparsity_profile", "--sparsity_allocation", dest="sparsity_profile", default=None,
                   help="JSON profile of per-layer (or per-module) sparsity to prune with instead of a uniform ratio")
    p.add_argument("--num_blocks", type=int, default=None,
                   help="how many contiguous layer blocks an original-format block profile describes, and the "
                        "blocks of --search_granularity block (default 8, capped at the layer count)")
    s = p.add_argument_group("layer-wise allocation and search (lib/search.py and friends, lib/owl.py)")
    s.add_argument("--search", default=None, choices=["sparsity", "kv", "joint", "none"],
                   help="Optuna search of per-unit sparsity (any calibrated method), per-layer KV bits (any method), "
                        "or both. Default: --prune_method optspa searches sparsity (the paper's method), every "
                        "other method prunes uniformly; 'none' never searches")
    s.add_argument("--search_granularity", default=None, choices=list(GRANULARITIES),
                   help="one ratio per layer block (--num_blocks), per layer, per linear (module), or per block "
                        "and projection type (block_module: q, k, v, o, gate, up, down); trend: a depth trend "
                        "(slope, curve) plus one offset per projection type, nine numbers; trend_layer: the trend "
                        "for --coarse_fraction of the evaluations, then every layer around the best trend "
                        f"(default: trend up to a {LOW_TARGET:g} target, {DEFAULT_GRANULARITY} above; chosen by "
                        "the SmolLM2 ablation)")
    s.add_argument("--no_trend_types", action="store_true",
                   help="trend, trend_layer: the depth terms only, one ratio per layer (the ablation)")
    s.add_argument("--coarse_fraction", type=float, default=None,
                   help="trend_layer: share of the evaluations (of --n_trials without --search_budget) spent on "
                        "the trend before the per-layer refinement (default: 0.25 up to a 50%% target, 0.5 from "
                        "60%%, linear in between; chosen by the SmolLM2 ablation)")
    s.add_argument("--coarse_sampler", default=SearchConfig.coarse_sampler, choices=list(COARSE_SAMPLERS),
                   help="trend_layer: the Optuna sampler of the trend stage; the per-layer stage uses --sampler. "
                        "cmaes: a local search from the uniform allocation (default "
                        f"{SearchConfig.coarse_sampler})")
    s.add_argument("--startup_scale", type=float, default=SearchConfig.startup_scale,
                   help="tpe: its ten random start-up draws span this share of each sparsity range around the "
                        f"uniform allocation instead of the whole range (default {SearchConfig.startup_scale:g})")
    s.add_argument("--sparsity_range", type=float, default=None,
                   help="ratios searched within target +- this, clipped to [0, 0.99) (default: 0.2 up to a 60%% "
                        "target, 0.3 from 70%%, linear in between; chosen by the SmolLM2 ablation)")
    s.add_argument("--sparsity_step", type=float, default=0.025,
                   help="ratio step of the smallest unit; larger units step by the same number of weights, so "
                        "every move keeps the budget exact (default 0.025)")
    s.add_argument("--kv_bits_choices", type=int, nargs="+", default=[6, 8], help="KV bit-widths per layer (6 8)")
    s.add_argument("--kv_avg_bits", type=float, default=None,
                   help="KV average-bits budget (default: midway between the lowest and highest choice)")
    s.add_argument("--kv_separate", action="store_true",
                   help="search key and value bits separately (2 x layers parameters under one average)")
    s.add_argument("--n_trials", type=int, default=100,
                   help="finished trials (complete or stopped early) the study should hold (default 100)")
    s.add_argument("--search_budget", type=float, default=None,
                   help="stop once the study has spent this many full objective evaluations (trials stopped early "
                        "count by the windows they scored); default: no cap besides --n_trials")
    s.add_argument("--sampler", default="tpe", choices=list(SAMPLERS),
                   help="Optuna sampler: tpe (default, as the paper), gp, cmaes, evolution (EvoPress-style level "
                        "switches), random")
    s.add_argument("--pruner", default="auto", choices=["auto", *PRUNERS],
                   help="Optuna pruner that stops hopeless trials from their running objective: median (Optuna's "
                        "MedianPruner: a trial's best value so far against the median), running (the median rule "
                        "on the value at the current window), halving, baseline (median, and a trial worse than "
                        "the uniform allocation, trial 0, at the same window is stopped), none; auto (default): "
                        "median, none with gp and cmaes and in a --coarse_sampler cmaes trend stage (they learn "
                        "from complete trials only)")
    s.add_argument("--coarse_pruner", default="auto", choices=["auto", *PRUNERS],
                   help="trend_layer: the pruner of the trend stage; the per-layer stage uses --pruner. auto "
                        "(default): as --pruner (with --pruner auto: none in a --coarse_sampler cmaes stage)")
    s.add_argument("--search_seed", type=int, default=None,
                   help="sampler seed (default --seed); every trial draws from (seed, trial number), so workers "
                        "sharing a study never repeat each other's points")
    s.add_argument("--restarts", type=int, default=None,
                   help="independent searches, the sampler seeded --search_seed, +1, ...: each its own study "
                        "(--study_name, then -restart1, ...) with its own --n_trials and --search_budget; the one "
                        "whose shipped model scores best ships (default: 2 for a wanda or optspa sparsity search "
                        "above a 55%% target, where one search's draws spread widely; 1 otherwise)")
    s.add_argument("--restart_mean", action=argparse.BooleanOptionalAction, default=None,
                   help="after the restarts, prune the mean of their best allocations (budget kept exact), "
                        "oneshot and re-pruned as --reprune_top allows, score it on the objective and ship it "
                        "only if it beats every restart's model (bagging: the restarts' noise averages out). "
                        "Default: on where two restarts are the default (a wanda or optspa sparsity search above 55%%)")
    s.add_argument("--trial_mode", default="auto", choices=["auto", "oneshot", "sequential"],
                   help="oneshot: from dense activations once, each trial thresholds the scores (SparseGPT: "
                        "runs its layer-wise passes on the dense Hessians); sequential: layer-by-layer "
                        "recalibration per trial; auto: oneshot")
    s.add_argument("--trial_stats", default=None, choices=["dense", "uniform"],
                   help="oneshot trials' activations (and SparseGPT's Hessians): the dense model's, or those of "
                        "the method's uniform sequential pruning at the target, so trials see inputs shifted by "
                        "upstream pruning as a sequential pruning does (one such pruning at setup). Default: "
                        f"uniform up to a {LOW_TARGET:g} target, dense above (the SmolLM2 ablation)")
    s.add_argument("--reprune_top", type=int, default=1,
                   help="after the search, re-prune the best K profiles sequentially, score them on the same "
                        "objective and ship one only if it beats the best trial (default 1; 0 = off)")
    s.add_argument("--select_top", type=int, default=0,
                   help="after the search, score the K best trials again on --select_nsamples windows and ship the "
                        "best of them there (EvoPress's last selection step; default 0 = off)")
    s.add_argument("--elite_mean", type=int, default=0,
                   help="the budget's last trial scores the mean of the K best trials' parameters (CMA-ES's "
                        "recombination; in trend_layer's per-layer stage); like any trial it ships only if it "
                        "scores best (default 0 = off)")
    s.add_argument("--select_nsamples", type=int, default=None,
                   help="windows of the selection (default 4x --objective_nsamples), read as the objective reads")
    s.add_argument("--objective", default="ppl", choices=["ppl", "kl"],
                   help="trial score: validation perplexity (default, the paper's), or KL divergence to the dense "
                        "model's next-token distribution on calibration text (streamed window by window)")
    s.add_argument("--objective_dataset", default=None,
                   help="objective text: default wikitext2 validation for ppl, calibration-dataset text "
                        "(fresh windows) for kl; never a test split")
    s.add_argument("--objective_nsamples", type=int, default=64,
                   help="seqlen windows of objective text per evaluation (64)")
    s.add_argument("--objective_windows", default="first", choices=["first", "spread"],
                   help="which validation windows the objective reads: the first --objective_nsamples (default) "
                        "or as many evenly spaced over the whole split (more articles, same cost)")
    s.add_argument("--storage", default=None,
                   help="Optuna storage URL shared by workers (postgresql://, mysql://, sqlite:///, or a journal "
                        "file: journal:PATH / *.log); default sqlite file search.db in --save")
    s.add_argument("--study_name", default=None, help="study name (default from model, search, granularity, target)")
    s.add_argument("--layer_allocation", default=None, choices=["uniform", "owl"],
                   help="a non-searched per-layer allocation: uniform (for optspa: the metric without the search, "
                        "the ablation), or OWL (outlier-weighted)")
    s.add_argument("--owl_lambda", type=float, default=0.08, help="OWL: ratios within target +- lambda (0.08)")
    s.add_argument("--owl_m", type=float, default=5.0, help="OWL: outlier = score above M x layer mean (5)")
    k = p.add_argument_group("KV-cache quantization (lib/kvquant.py), simulated during evaluation")
    k.add_argument("--kv_bits", type=int, default=None, choices=[2, 3, 4, 5, 6, 8, 16],
                   help="bits for keys and values in every decoder layer (16 = off)")
    k.add_argument("--kv_profile", default=None,
                   help="per-layer KV bits: a profile JSON (the format --save writes; kv_bits entry) or an inline "
                        "spec such as 8x16,6x16 (K[/V]xN items)")
    k.add_argument("--kv_group_size", type=int, default=32,
                   help="elements per quantization group along the head dimension (must divide it; default 32)")
    k.add_argument("--kv_token_group", type=int, default=64,
                   help="tokens per key group in the kivi scheme (default 64)")
    k.add_argument("--kv_residual", type=int, default=0,
                   help="most recent tokens kept in full precision (default 0)")
    k.add_argument("--kv_scheme", default="kivi", choices=["kivi", "per_token"],
                   help="kivi: keys per channel, values per token (default); per_token: both per token")
    b = p.add_argument_group("head-wise KV budgets (lib/kvbudget.py, lib/kvevict.py): SnapKV/SparseMM eviction, "
                             "evaluated on a long-context continuation")
    b.add_argument("--kv_budget", type=int, default=None,
                   help="tokens kept per KV head after prefill, window included; evaluates WikiText-2 test "
                        "continuation perplexity with the eviction cache (and --kv_bits/--kv_profile bits). "
                        "Without it, a --kv_profile/--sparsity_profile that records per-head budgets (kv_budget) "
                        "is evaluated with those")
    b.add_argument("--head_scores", default=None,
                   help="head scores to allocate --kv_budget by (SparseMM JSON: {\"layer-head\": [scores]}); "
                        "without it the budget is uniform (SnapKV)")
    b.add_argument("--head_scores_out", default=None,
                   help="compute head scores with --head_probe, write them here (SparseMM JSON) and use them")
    b.add_argument("--head_probe", default="auto", choices=["auto", "copy", "visual"],
                   help="visual: OCR-style probe images (LLaVA); copy: copy/retrieval probe; auto: visual for LLaVA")
    b.add_argument("--head_probe_samples", type=int, default=8, help="probe samples (default 8)")
    b.add_argument("--kv_window", type=int, default=32, help="observation window always kept (default 32)")
    b.add_argument("--kv_budget_floor", type=float, default=0.1,
                   help="uniform floor as a fraction of the non-window budget (SparseMM's ratio, default 0.1)")
    b.add_argument("--kv_pooling", default="maxpool", choices=["maxpool", "avgpool"], help="SnapKV pooling")
    b.add_argument("--kv_kernel", type=int, default=7, help="SnapKV pooling kernel (odd, default 7)")
    b.add_argument("--kv_prefill", type=int, default=None,
                   help="prefill tokens per span (default min(2048, positions - continuation))")
    b.add_argument("--kv_continuation", type=int, default=None,
                   help="continuation tokens scored per span (default min(256, positions / 4))")
    b.add_argument("--kv_segments", type=int, default=4, help="disjoint WikiText-2 test spans (default 4)")
    p.add_argument("--eval_datasets", nargs="+", default=["wikitext2"], choices=["wikitext2", "c4"],
                   help="perplexity evaluation sets (default wikitext2 test; c4 = validation)")
    p.add_argument("--eval_batch_size", type=int, default=1, help="windows per forward pass in evaluation")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block size (default 128)")
    p.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT Hessian dampening (default 0.01)")
    p.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level")
    m = p.add_argument_group("LLaVA: original checkpoints, image-text calibration, VQA evaluation "
                             "(lib/llava_original.py, lib/mmdata.py, lib/lmms_adapter.py)")
    m.add_argument("--vision_tower", default=None,
                   help="local CLIP folder for an original LLaVA checkpoint's mm_vision_tower (offline nodes); "
                        "loaded only for image work")
    m.add_argument("--image_dir", default=None,
                   help="images of an image-text --calib_dataset (default: next to its JSON, or its images/)")
    m.add_argument("--eval_lmms", default=None,
                   help="comma-separated lmms-eval tasks run on the model in memory (pip install lmms-eval; "
                        "INSTALL.md)")
    m.add_argument("--lmms_include", default=None, help="folder of extra (local) lmms-eval task YAMLs")
    m.add_argument("--lmms_limit", type=int, default=None, help="documents per lmms-eval task (default all)")
    return p


def validate_multimodal(args) -> None:
    """Image-text calibration, vision-tower and lmms-eval flags; raises UsageError before any loading."""
    from lib import mmdata

    if args.calib_dataset not in ("c4", "wikitext2") and not mmdata.is_image_text(args.calib_dataset):
        raise UsageError(f"--calib_dataset {args.calib_dataset}: choose c4, wikitext2, "
                         f"{', '.join(mmdata.HUB_SETS)} or a LLaVA conversation .json/.jsonl file")
    objective = args.objective_dataset
    if objective is not None and objective not in ("c4", "wikitext2") and not mmdata.is_image_text(objective):
        raise UsageError(f"--objective_dataset {objective}: choose wikitext2, c4, {', '.join(mmdata.HUB_SETS)} or a "
                         "LLaVA conversation .json/.jsonl file")
    if args.search is not None and mmdata.is_image_text(objective or "") and args.objective != "ppl":
        raise UsageError("an image-text search objective is image-conditioned perplexity: use --objective ppl")
    for flag, folder in (("--image_dir", args.image_dir), ("--vision_tower", args.vision_tower),
                         ("--lmms_include", args.lmms_include)):
        if folder is not None and not os.path.isdir(folder):
            raise UsageError(f"{flag} {folder} is not a directory")
    if args.eval_lmms is not None:
        from lib.lmms_adapter import LmmsUnavailable, unknown_tasks

        try:
            unknown = unknown_tasks(lmms_tasks(args), args.lmms_include)
        except LmmsUnavailable as exc:
            raise UsageError(str(exc)) from exc
        if unknown or not lmms_tasks(args):
            raise UsageError(f"--eval_lmms: unknown lmms-eval task(s) {', '.join(unknown) or '(none given)'} "
                             "(local tasks: --lmms_include DIR)")


def lmms_tasks(args) -> list[str]:
    return [t.strip() for t in (args.eval_lmms or "").split(",") if t.strip()]


def wants_images(args) -> bool:
    """Whether the run needs the vision side (image-text calibration or lmms-eval)."""
    from lib import mmdata

    return (needs_calibration(args) and mmdata.is_image_text(args.calib_dataset)) or args.eval_lmms is not None \
        or (args.search is not None and mmdata.is_image_text(args.objective_dataset or ""))


def validate(args) -> "SparsityType":
    """Everything that can be checked before loading a model; raises UsageError."""
    from lib.io import check_writable_dir
    from lib.sparsity import SparsityType

    try:
        pattern = SparsityType.parse(args.sparsity_type)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.sparsity_ratio is None:
        args.sparsity_ratio = pattern.ratio if pattern.structured else (0.0 if args.prune_method == "dense" else None)
    if args.sparsity_ratio is None and args.sparsity_profile is None and args.masks is None:
        raise UsageError(f"--prune_method {args.prune_method} needs --sparsity_ratio (or --sparsity_profile)")
    if args.sparsity_ratio is not None and not 0 <= args.sparsity_ratio < 1:
        raise UsageError(f"--sparsity_ratio {args.sparsity_ratio} is outside [0, 1)")
    if pattern.structured and args.sparsity_ratio is not None and abs(args.sparsity_ratio - pattern.ratio) > 1e-9:
        raise UsageError(f"--sparsity_type {pattern} prunes {pattern.ratio:g} of the weights, "
                         f"but --sparsity_ratio is {args.sparsity_ratio:g}")
    if args.use_variant and args.prune_method != "wanda":
        raise UsageError("--use_variant applies to --prune_method wanda only")
    if args.use_variant and pattern.structured:
        raise UsageError("--use_variant is for unstructured sparsity (Wanda's variant has no N:M form)")
    if args.masks is not None and args.prune_method != "dense":
        raise UsageError("--masks reapplies saved masks; do not combine it with --prune_method")
    if args.masks is not None and args.sparsity_profile is not None:
        raise UsageError("--masks reapplies saved masks; do not combine it with --sparsity_profile")
    if args.nsamples < 1:
        raise UsageError("--nsamples must be at least 1")
    if args.seqlen is not None and args.seqlen < 2:
        raise UsageError("--seqlen must be at least 2")
    if args.num_blocks is not None and args.num_blocks < 1:
        raise UsageError("--num_blocks must be at least 1")
    validate_search(args, pattern)
    for flag, path in (("--save", args.save), ("--save_model", args.save_model)):
        if path is not None:
            why = check_writable_dir(path)
            if why:
                raise UsageError(f"{flag}: {why}")
    if args.masks is not None and not os.path.exists(args.masks):
        raise UsageError(f"--masks {args.masks} does not exist")
    if args.sparsity_profile is not None and not os.path.isfile(args.sparsity_profile):
        raise UsageError(f"--sparsity_profile {args.sparsity_profile} does not exist")
    validate_multimodal(args)
    if args.eval_zero_shot:
        try:
            import lm_eval  # noqa: F401
        except ImportError as exc:
            raise UsageError("--eval_zero_shot needs lm-eval-harness: pip install lm-eval") from exc
    return pattern


def resolve_search(args, pattern) -> None:
    """Fill in what the search flags mean when not given (before anything is loaded).

    ``--prune_method optspa`` is "search, then prune", as in the original tool, unless a profile, masks, an
    explicit ``--layer_allocation`` or ``--search none`` says otherwise; N:M patterns are uniform by
    construction. ``--trial_mode auto`` is oneshot (for SparseGPT: its passes on the dense model's Hessians).
    """
    if args.search == "none":
        args.search = None
    elif args.search is None and args.prune_method == "optspa" and args.sparsity_profile is None and \
            args.masks is None and args.layer_allocation is None:
        if pattern.structured:
            logger.info("%s sparsity is uniform by construction: pruning with the Optspa metric, no search", pattern)
        else:
            args.search = "sparsity"
            logger.info("--prune_method optspa: searching the sparsity allocation, then pruning with the best "
                        "profile (--layer_allocation uniform prunes with the uniform metric instead)")
    if args.layer_allocation is None:
        args.layer_allocation = "uniform"
    if args.trial_mode == "auto":
        args.trial_mode = "oneshot"
    if args.objective_dataset is None:
        args.objective_dataset = args.calib_dataset if args.objective == "kl" else "wikitext2"
    from lib import mmdata

    if args.search is not None and mmdata.is_image_text(args.objective_dataset) and args.objective != "ppl":
        raise UsageError("an image-text search objective is image-conditioned perplexity: use --objective ppl "
                         "(or --objective_dataset wikitext2 or c4)")


def search_config(args, target: float):
    from lib.search_config import SearchConfig

    return SearchConfig(
        target=target, kind=args.search, granularity=args.search_granularity, num_blocks=args.num_blocks or 8,
        coarse_fraction=args.coarse_fraction, coarse_sampler=args.coarse_sampler, startup_scale=args.startup_scale,
        trend_types=not args.no_trend_types,
        sparsity_range=args.sparsity_range, sparsity_step=args.sparsity_step,
        kv_bits_choices=tuple(args.kv_bits_choices), kv_avg_bits=args.kv_avg_bits, kv_separate=args.kv_separate,
        n_trials=args.n_trials, budget_evals=args.search_budget,
        seed=args.seed if args.search_seed is None else args.search_seed, trial_mode=args.trial_mode,
        trial_stats=args.trial_stats,
        method=args.prune_method, sampler=args.sampler, pruner=args.pruner, coarse_pruner=args.coarse_pruner,
        reprune_top=args.reprune_top, restarts=args.restarts, restart_mean=args.restart_mean,
        select_top=args.select_top, select_nsamples=args.select_nsamples, elite_mean=args.elite_mean,
        objective=args.objective,
        storage=args.storage, study_name=args.study_name, save_dir=args.save,
        batch_size=args.eval_batch_size, blocksize=args.blocksize, percdamp=args.percdamp)


def validate_search(args, pattern) -> None:
    """Search and OWL flag combinations that cannot work; raises UsageError before any loading."""
    from lib.search_config import SearchError

    resolve_search(args, pattern)
    if args.search in ("sparsity", "joint"):
        if args.prune_method not in ("wanda", "optspa", "sparsegpt"):
            raise UsageError(f"--search {args.search} needs a calibrated method (--prune_method wanda, optspa or "
                             "sparsegpt); --search kv works with any method")
        if pattern.structured:
            raise UsageError(f"--search {args.search} needs unstructured sparsity "
                             f"({pattern} is uniform by construction)")
        if args.sparsity_profile is not None:
            raise UsageError(f"--search {args.search} finds a profile; do not combine it with --sparsity_profile")
        if args.layer_allocation != "uniform":
            raise UsageError(f"--layer_allocation {args.layer_allocation} is a non-searched baseline; "
                             "drop it or --search")
        if args.use_variant:
            raise UsageError("--use_variant sets its own per-row ratios; it cannot follow a searched profile")
    if args.search in ("kv", "joint") and (args.kv_bits is not None or args.kv_profile is not None):
        raise UsageError(f"--search {args.search} searches the KV bits; do not combine it with "
                         f"{'--kv_bits' if args.kv_bits is not None else '--kv_profile'}")
    if args.search is not None:
        if args.save is None:
            raise UsageError("--search needs --save (trials, profile, plot and the default study database go there)")
        if args.objective_nsamples < 1:
            raise UsageError("--objective_nsamples must be at least 1")
        from lib.mmdata import is_image_text

        if args.objective_windows == "spread" and (is_image_text(args.objective_dataset)
                                                   or objective_draws_calibration(args)):
            raise UsageError("--objective_windows spread picks windows of a validation split; this objective draws "
                             "fresh calibration windows (drop it)")
        try:
            search_config(args, args.sparsity_ratio or 0.0).check()
        except SearchError as exc:
            raise UsageError(str(exc)) from exc
    if args.layer_allocation == "owl":
        if args.prune_method == "dense" or args.masks is not None:
            raise UsageError("--layer_allocation owl needs a pruning method")
        if pattern.structured or args.sparsity_profile is not None:
            raise UsageError("--layer_allocation owl sets unstructured per-layer ratios; not with N:M or a profile")
        if not 0 <= args.owl_lambda < 0.5 or args.owl_m <= 0:
            raise UsageError("--owl_lambda must be in [0, 0.5) and --owl_m positive")


def load_calibration(args, tokenizer, seqlen: int, processor=None):
    """The calibration windows, with Wanda's log lines (drawn once per run: search, OWL and pruning share them).
    Image-text data (lib/mmdata.py) goes through the LLaVA processor: windows of different lengths with images."""
    from lib import data, mmdata

    logger.info("loading calibdation data (%s, %d samples of %d tokens)", args.calib_dataset, args.nsamples, seqlen)
    if mmdata.is_image_text(args.calib_dataset):
        image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        calib = mmdata.get_image_text_calibration(args.calib_dataset, processor, args.nsamples, args.seed, seqlen,
                                                  image_id, args.data_dir, args.image_dir, args.cache_dir)
        stats = mmdata.window_stats(calib, image_id)
        logger.info("image-text calibration: %d windows of %d to %d tokens, %d tokens, %d image tokens (%.1f%%)",
                    stats.windows, stats.min_len, stats.max_len, stats.tokens, stats.image_tokens,
                    100 * stats.image_share)
        logger.info("dataset loading complete")
        return calib
    calib = data.get_calibration(args.calib_dataset, tokenizer, args.nsamples, args.seed, seqlen, args.data_dir)
    logger.info("dataset loading complete")
    return calib


def objective_tokens(args, tokenizer, seqlen: int, processor=None, nsamples: int | None = None):
    """The search objective's text as ``[1, N]`` ids: a validation split for ppl; for kl, fresh windows of the
    calibration dataset (another seed than the calibration draw). Never a test split. An image-text dataset
    gives image-text windows (another seed than the calibration draw), scored on image-conditioned loss.
    ``nsamples``: windows to provide (default --objective_nsamples; the selection asks for more)."""
    import torch

    from lib import data, mmdata

    nsamples = nsamples or args.objective_nsamples

    if mmdata.is_image_text(args.objective_dataset):
        image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        windows = mmdata.get_image_text_calibration(args.objective_dataset, processor, nsamples,
                                                    args.seed + 1, seqlen, image_id, args.data_dir, args.image_dir,
                                                    args.cache_dir)
        stats = mmdata.window_stats(windows, image_id)
        logger.info("image-text objective: %d windows, %d tokens, %d image tokens (not scored)", stats.windows,
                    stats.tokens, stats.image_tokens)
        return windows

    if objective_draws_calibration(args):
        windows = data.get_calibration(args.objective_dataset, tokenizer, nsamples, args.seed + 1,
                                       seqlen, args.data_dir)
        return torch.cat(windows, dim=1)
    ids = data.get_eval_tokens(args.objective_dataset, tokenizer, args.data_dir, "validation", seqlen)
    if args.objective_windows == "spread":
        from lib.eval import spread_windows

        return spread_windows(ids, seqlen, nsamples)
    return ids


def objective_draws_calibration(args) -> bool:
    """KL on the calibration dataset: fresh calibration windows (another seed), not a validation split."""
    return args.objective == "kl" and args.objective_dataset == args.calib_dataset


def objective_meta(args) -> dict:
    """What a searched profile was scored on, kept in it (the study's fingerprint refuses anything else)."""
    return {"objective_dataset": args.objective_dataset, "objective_nsamples": args.objective_nsamples,
            "objective_windows": args.objective_windows, "select_top": args.select_top}


def selection_tokens(args, tokenizer, seqlen: int, processor=None):
    """The selection's windows (--select_top), drawn as the objective's are; None without a selection, or when
    the objective's text already holds them (the first windows of a validation split: the search reuses it)."""
    from lib.mmdata import is_image_text
    from lib.search_config import selection_nsamples

    reads_first = not (is_image_text(args.objective_dataset) or objective_draws_calibration(args)
                       or args.objective_windows == "spread")
    if args.select_top <= 0 or reads_first:
        return None
    return objective_tokens(args, tokenizer, seqlen, processor,
                            selection_nsamples(args.select_nsamples, args.objective_nsamples))


def allocate_layers(args, model, tokenizer, pattern, seqlen, device, offload, processor=None, trial_kv=None):
    """Per-layer sparsity from OWL or the search; returns (profile, calibration windows, search result).
    After a sparsity search the model is pruned as shipped (``result.prune`` holds its masks); ``trial_kv``:
    the --kv_bits / --kv_profile quantization its trials run under, as the final evaluation does."""
    from lib import models
    from lib.oneshot import input_stats
    from lib.owl import owl_profile
    from lib.search import run_search

    calib = load_calibration(args, tokenizer, seqlen, processor)
    num_layers = len(models.decoder_layers(model))
    if args.layer_allocation == "owl":
        stats = input_stats(model, calib, device, offload)
        profile = owl_profile(model, stats, args.sparsity_ratio, args.owl_lambda, args.owl_m,
                              sparsity_type=str(pattern))
        return profile, calib, None
    cfg = search_config(args, args.sparsity_ratio)
    if args.num_blocks is None:
        cfg.num_blocks = min(cfg.num_blocks, num_layers)
    result = run_search(model, cfg, calib=calib, objective_ids=objective_tokens(args, tokenizer, seqlen, processor),
                        seqlen=seqlen, objective_nsamples=args.objective_nsamples, device=device, offload=offload,
                        model_name=args.model, kv_kwargs=kv_kwargs(args), trial_kv=trial_kv,
                        selection_ids=selection_tokens(args, tokenizer, seqlen, processor))
    result.profile.sparsity_type = str(pattern)
    result.profile.meta.update(objective_meta(args))
    return result.profile, calib, result


def search_kv(args, model, tokenizer, profile, pattern, seqlen, device, offload, processor=None):
    """KV bits per layer searched on the model as it is now (pruned or dense); returns (profile, result)."""
    from lib import models
    from lib.profile import Profile
    from lib.search import run_search

    num_layers = len(models.decoder_layers(model))
    base = profile or Profile.uniform(num_layers, 0.0, sparsity_type=str(pattern))
    cfg = search_config(args, args.sparsity_ratio or 0.0)
    result = run_search(model, cfg, calib=None, objective_ids=objective_tokens(args, tokenizer, seqlen, processor),
                        seqlen=seqlen, objective_nsamples=args.objective_nsamples, device=device, offload=offload,
                        model_name=args.model, base_profile=base, kv_kwargs=kv_kwargs(args),
                        selection_ids=selection_tokens(args, tokenizer, seqlen, processor))
    result.profile.method = args.prune_method
    result.profile.meta.update(objective_meta(args))
    return result.profile, result


def kv_kwargs(args) -> dict:
    """The --kv_* quantizer settings, shared by the KV search and the final evaluation."""
    return dict(group_size=args.kv_group_size, token_group_size=args.kv_token_group, residual=args.kv_residual,
                scheme=args.kv_scheme)


def read_profile_files(args, num_layers: int) -> dict:
    """The profile files --kv_profile and --sparsity_profile name, each read and parsed once, keyed by flag
    (an inline --kv_profile spec such as ``8x16,6x16`` is not a file and is not here)."""
    from lib.profile import load_profile

    files = {}
    if args.kv_profile is not None and os.path.isfile(args.kv_profile):
        files["--kv_profile"] = load_profile(args.kv_profile, num_layers, args.num_blocks)
    if args.sparsity_profile is not None:
        files["--sparsity_profile"] = load_profile(args.sparsity_profile, num_layers, args.num_blocks)
    return files


def cli_kv_config(args, model, files: dict):
    """The KV quantization --kv_bits / --kv_profile ask for (None: none asked), checked against the model
    (bits, layer count, groups) before any search or pruning; with a KV or joint search still to run, the
    --kv_* settings are checked with uniform 8-bit. ``files``: :func:`read_profile_files`."""
    from lib.kvquant import KVQuantConfig, kv_dims

    searched = args.search in ("kv", "joint")
    if args.kv_bits is None and args.kv_profile is None and not searched:
        return None
    num_layers, _, head_dim = kv_dims(model)
    kw = kv_kwargs(args)
    kv_file = files.get("--kv_profile")
    kv_profile = args.kv_profile if kv_file is None else kv_file
    if kv_file is not None and kv_file.key_bits is None and kv_file.kv_budget is not None:
        kv_profile = None  # a budget-only profile: per-head budgets (saved_kv_budget), no bits
    try:
        cfg = KVQuantConfig.from_cli(num_layers, kv_bits=args.kv_bits, kv_profile=kv_profile, **kw)
        (cfg or KVQuantConfig.uniform(8, num_layers, **kw)).validate(num_layers, head_dim)
    except ValueError as exc:
        raise UsageError(f"KV quantization: {exc}") from exc
    return cfg


def profile_kv_config(args, model, profile):
    """The KV quantization the bits in ``profile`` (searched, or from --sparsity_profile) ask for; None when
    it carries none."""
    from lib.kvquant import KVQuantConfig, kv_dims

    if profile is None or profile.key_bits is None:
        return None
    num_layers, _, head_dim = kv_dims(model)
    try:
        return KVQuantConfig.from_profile(profile, num_layers, **kv_kwargs(args)).validate(num_layers, head_dim)
    except ValueError as exc:
        raise UsageError(f"KV quantization: {exc}") from exc


def saved_kv_budget(args, model, files: dict):
    """The per-head budgets a loaded profile carries (--kv_profile first, then --sparsity_profile), checked
    against the model before any work; None when --kv_budget is given (it wins) or no profile has them."""
    from lib import models
    from lib.kvbudget import KVBudgetConfig

    if args.kv_budget is not None:
        return None
    for flag in ("--kv_profile", "--sparsity_profile"):
        entry = files[flag].kv_budget if flag in files else None
        if entry is None:
            continue
        path = getattr(args, flag[2:])
        if args.head_scores is not None:
            raise UsageError(f"{flag} {path} carries per-head budgets already; give --kv_budget N to allocate "
                             "anew by --head_scores")
        cfg = models.text_config(model)
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        try:
            budget = KVBudgetConfig.from_dict(entry).validate(cfg.num_hidden_layers, kv_heads)
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"{flag} {path}: its kv_budget entry does not fit: {exc}") from exc
        logger.info("per-head KV budgets from %s %s: %s", flag, path, budget.describe())
        return budget
    return None


def resolve_device(requested: str | None) -> str:
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(requested)
    except RuntimeError as exc:
        raise UsageError(f"--device {requested}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {requested}: CUDA is not available on this machine")
    return requested


@dataclass
class Run:
    """What one run carries from stage to stage (see :func:`run`)."""

    args: argparse.Namespace
    pattern: Any
    device: str
    loaded: Any = None
    seqlen: int = 0
    offload: bool = False
    profile: Any = None  # the per-layer sparsity (and KV bits) pruned with and saved; None for masks runs
    calib: Any = None
    search: Any = None
    result: Any = None  # PruneResult when this run pruned
    manifest: dict | None = None  # the masks manifest of a --masks run
    method: str = "dense"
    sparsity: float = 0.0
    per_layer: list = field(default_factory=list)
    kv: Any = None
    kv_report: dict = field(default_factory=dict)
    ppl: dict = field(default_factory=dict)
    zero_shot: Any = None
    processor: Any = None  # the LLaVA processor when the run needs images (wants_images)
    lmms: Any = None  # lmms-eval results per task
    saved_kv_budget: Any = None  # KVBudgetConfig a loaded profile carries (used when --kv_budget is not given)
    profile_files: dict = field(default_factory=dict)  # --kv_profile / --sparsity_profile files, read once
    cli_kv: Any = None  # the KV quantization --kv_bits / --kv_profile ask for (search trials run under it)

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer


def needs_calibration(args) -> bool:
    return (args.prune_method in ("wanda", "sparsegpt", "optspa") and args.masks is None) or \
        args.layer_allocation == "owl" or args.search in ("sparsity", "joint")


def check_inputs(args) -> Run:
    """Stage 1: every flag, output folder and local dataset checked before anything is loaded."""
    from lib import data, mmdata

    pattern = validate(args)
    device = resolve_device(args.device)
    # Fail on missing local data before spending minutes on loading the model.
    if needs_calibration(args):
        from lib import mmdata

        if mmdata.is_image_text(args.calib_dataset):
            mmdata.check_available(args.calib_dataset, args.data_dir, args.image_dir)
        else:
            data.check_available(args.calib_dataset, "train", args.data_dir)
    for name in args.eval_datasets:
        data.check_available(name, "test" if name == "wikitext2" else "validation", args.data_dir)
    if args.search is not None:
        kl_on_calib = args.objective == "kl" and args.objective_dataset == args.calib_dataset
        if mmdata.is_image_text(args.objective_dataset):
            mmdata.check_available(args.objective_dataset, args.data_dir, args.image_dir)
        else:
            data.check_available(args.objective_dataset, "train" if kl_on_calib else "validation", args.data_dir)
    return Run(args=args, pattern=pattern, device=device, method=args.prune_method)


def load(st: Run) -> None:
    """Stage 2: the model on the CPU, the window length, the offload decision (weights and calibration
    buffers), the placement, and the checks that need the model."""
    from lib import models

    args = st.args
    logger.info("loading llm model %s", args.model)
    st.loaded = models.load_model(args.model, cache_dir=args.cache_dir, dtype=args.dtype, device=st.device)
    if wants_images(args):
        prepare_images(st)
    model = st.model
    st.seqlen = models.default_seqlen(model, args.seqlen)
    num_layers = len(models.decoder_layers(model))
    dtype = next(model.parameters()).dtype
    buffers = models.calib_buffer_bytes(args.nsamples, st.seqlen, models.text_config(model).hidden_size, dtype) \
        if needs_calibration(args) else 0
    if args.search in ("sparsity", "joint") and args.trial_mode == "oneshot" and args.prune_method != "sparsegpt":
        from lib.search_space import band_bytes_estimate

        linears = sum(m.weight.numel() for layer in models.decoder_layers(model)
                      for m in models.find_linears(layer).values())
        buffers += band_bytes_estimate(linears, search_config(args, args.sparsity_ratio or 0.0).sparsity_range)
    try:
        st.offload = models.should_offload(model, st.device, args.offload, buffer_bytes=buffers)
    except models.DeviceMemoryError as exc:
        raise UsageError(f"{exc}: lower --nsamples or --seqlen") from exc
    models.place_model(model, st.device, st.offload)
    st.profile_files = read_profile_files(args, num_layers)
    st.cli_kv = cli_kv_config(args, model, st.profile_files)
    st.saved_kv_budget = saved_kv_budget(args, model, st.profile_files)
    if st.saved_kv_budget is not None:
        from lib import data

        data.check_available("wikitext2", "test", args.data_dir)
    if args.search in ("sparsity", "joint") and args.search_granularity == "block" and \
            args.num_blocks is not None and args.num_blocks > num_layers:
        raise UsageError(f"--num_blocks {args.num_blocks} is more than the model's {num_layers} decoder layers")
    logger.info("use device %s (dtype %s, offload %s, seqlen %d)", st.device, dtype, st.offload, st.seqlen)


def prepare_images(st: Run) -> None:
    """Image work needs the whole LLaVA model and its processor: an original checkpoint's language model is
    wrapped in transformers' Llava(Next) class with its vision tower (lib/llava_original.py); a llava-hf
    checkpoint brings its processor."""
    from lib import llava_original, models

    args, loaded = st.args, st.loaded
    if loaded.original_llava is not None:
        try:
            loaded.model, st.processor = llava_original.build_multimodal(
                loaded.model, loaded.tokenizer, loaded.original_llava, args.vision_tower, args.cache_dir)
        except llava_original.OriginalLlavaError as exc:
            raise UsageError(str(exc)) from exc
        loaded.multimodal = True
    elif loaded.multimodal:
        st.processor = models.load_processor(args.model, args.cache_dir)
    if st.processor is None:
        what = "a text-only model" if not loaded.multimodal else "a LLaVA checkpoint without a processor"
        raise UsageError(f"image-text calibration and --eval_lmms need a LLaVA model; {args.model} is {what}")


def allocate(st: Run) -> None:
    """Stage 3: the per-layer sparsity profile: --sparsity_profile, the uniform ratio, or OWL / the search."""
    from lib import models
    from lib.profile import Profile

    args, model, pattern = st.args, st.model, st.pattern
    if args.masks is not None:  # the masks say what is pruned; a masks run has no profile of its own
        return
    num_layers = len(models.decoder_layers(model))
    if args.sparsity_profile is not None:
        st.profile = st.profile_files["--sparsity_profile"]
        module_names = list(models.find_linears(models.decoder_layers(model)[0]))
        st.profile.validate(num_layers, module_names)
        if pattern.structured and not all(
            abs(st.profile.ratio(i, n) - pattern.ratio) < 1e-9 for i in range(num_layers) for n in module_names
        ):
            raise UsageError(f"{pattern} sparsity is uniform by construction; the profile varies its ratios")
        st.profile.sparsity_type = str(pattern)
    elif args.sparsity_ratio is not None:
        st.profile = Profile.uniform(num_layers, args.sparsity_ratio, sparsity_type=str(pattern))
    if args.search in ("sparsity", "joint") or args.layer_allocation == "owl":
        st.profile, st.calib, st.search = allocate_layers(args, model, st.tokenizer, pattern, st.seqlen, st.device,
                                                          st.offload, st.processor, st.cli_kv)


def apply_saved_masks(st: Run) -> None:
    """Stage 4a (--masks): zero what the saved masks say; the run then reports what their manifest says."""
    from lib import masks as masks_lib, models

    saved, st.manifest = masks_lib.load_masks(st.args.masks)
    masks_lib.apply_masks(st.model, saved, models.pruned_weight_names(st.model))
    st.method = st.manifest.get("method", "masks")
    logger.info("applied %d saved masks from %s (method %s)", len(saved), st.args.masks, st.method)


def prune(st: Run) -> None:
    """Stage 4: prune with the profile (or apply --masks); the search may have pruned already."""
    from lib.prune import profile_mean_sparsity, prune_magnitude, prune_optspa, prune_sparsegpt, prune_wanda

    args, model, pattern, profile = st.args, st.model, st.pattern, st.profile
    device, offload, method = st.device, st.offload, st.method
    if args.masks is not None:
        apply_saved_masks(st)
        return
    if st.search is not None and st.search.prune is not None:  # the search pruned the model as it ships it
        st.result = st.search.prune
        return
    if method == "dense" or profile is None:
        return
    profile.model, profile.method = args.model, method
    logger.info("pruning starts: %s, target sparsity %.4f, %s", method, profile_mean_sparsity(model, profile), pattern)
    if method == "magnitude":
        st.result = prune_magnitude(model, profile, pattern, device, offload)
    else:
        if st.calib is None:  # the search or OWL may have drawn it already
            st.calib = load_calibration(args, st.tokenizer, st.seqlen, st.processor)
        calib = st.calib
        from lib.oneshot import prune_oneshot, shipped_oneshot

        if shipped_oneshot(profile, method, pattern.structured):
            # The search shipped (and scored) this profile pruned oneshot: apply it the same way.
            logger.info("the profile shipped a oneshot-pruned model: pruned from %s", "the dense model's activations"
                        if profile.meta.get("trial_stats") != "uniform" else "its uniform sequential pruning's")
            st.result = prune_oneshot(model, calib, profile, method, device, offload, args.blocksize, args.percdamp)
        elif method == "wanda":
            st.result = prune_wanda(model, calib, profile, pattern, device, offload, use_variant=args.use_variant)
        elif method == "optspa":
            st.result = prune_optspa(model, calib, profile, pattern, device, offload)
        else:
            st.result = prune_sparsegpt(model, calib, profile, pattern, device, offload, args.blocksize,
                                        args.percdamp)
    logger.info("pruning done: %.2f s calibration forward passes, %.2f s metric and masks",
                st.result.calib_seconds, st.result.prune_seconds)


def search_kv_bits(st: Run) -> None:
    """Stage 4b (--search kv): KV bits per layer searched on the model as pruned."""
    st.profile, st.search = search_kv(st.args, st.model, st.tokenizer, st.profile, st.pattern, st.seqlen,
                                      st.device, st.offload, st.processor)


def report_sparsity(st: Run) -> None:
    """Stage 5: Wanda's sparsity sanity check of the model as it will be evaluated and saved."""
    from lib.prune import check_sparsity

    logger.info("*" * 40)
    st.sparsity, st.per_layer = check_sparsity(st.model)
    for i, s in enumerate(st.per_layer):
        logger.info("layer %d sparsity %.6f", i, s)
    logger.info("sparsity sanity check %.4f", st.sparsity)
    logger.info("*" * 40)


def configure_kv(st: Run) -> None:
    """Stage 6: the KV quantization every evaluation runs under (None: full precision)."""
    from lib.kvquant import kv_memory_report

    # The flags win over the bits a profile carries; the saved profile records the bits the run used.
    st.kv = st.cli_kv if st.cli_kv is not None else profile_kv_config(st.args, st.model, st.profile)
    if st.kv is not None and st.profile is not None:
        st.profile.key_bits, st.profile.value_bits = list(st.kv.key_bits), list(st.kv.value_bits)
    st.kv_report = kv_memory_report(st.kv, st.model)
    if st.kv is not None:
        logger.info("KV cache %s: %.1f bytes per token, %.3fx float16", st.kv.describe(),
                    st.kv_report["kv_bytes_per_token"], st.kv_report["ratio_to_fp16"])


def evaluation_plan(st: Run) -> dict:
    """Every evaluation of the run by name: perplexity per --eval_datasets, and the zero-shot tasks."""
    from lib import data
    from lib.eval import eval_ppl, eval_zero_shot

    args = st.args
    plan = {}
    for name in args.eval_datasets:
        def ppl(name=name):
            ids = data.get_eval_tokens(name, st.tokenizer, args.data_dir, "test", st.seqlen)
            value = eval_ppl(st.model, ids, st.seqlen, st.device, args.eval_batch_size, st.offload,
                             desc=f"{name} ppl")
            logger.info("%s perplexity %.4f", "wikitext" if name == "wikitext2" else name, value)
            return value
        plan[f"ppl:{name}"] = ppl
    if args.eval_zero_shot:
        plan["zero_shot"] = lambda: eval_zero_shot(st.model, st.tokenizer)
    if args.eval_lmms:
        from lib.lmms_adapter import evaluate as lmms_evaluate

        plan["lmms"] = lambda: lmms_evaluate(st.model, st.processor, lmms_tasks(args), device=st.device,
                                             include_path=args.lmms_include, limit=args.lmms_limit)
    return plan


def evaluate(st: Run) -> None:
    """Stage 7: perplexity and zero-shot, all under the one KV simulation of stage 6 (the same model)."""
    from lib.eval import run_evaluations

    results = run_evaluations(st.model, st.kv, evaluation_plan(st))
    st.ppl = {k.split(":", 1)[1]: v for k, v in results.items() if k.startswith("ppl:")}
    st.zero_shot = results.get("zero_shot")
    st.lmms = results.get("lmms")
    if st.zero_shot is not None:
        logger.info("zero-shot results: %s", json.dumps(st.zero_shot, default=str))


def check_kv_budget(args) -> None:
    """--kv_budget / head-score flags, before anything is loaded."""
    if args.kv_budget is not None and (args.kv_budget <= 0 or args.kv_budget < args.kv_window):
        raise UsageError(f"--kv_budget {args.kv_budget} must be positive and at least --kv_window {args.kv_window}")
    if args.kv_window < 0 or args.kv_kernel <= 0 or args.kv_kernel % 2 == 0:
        raise UsageError("--kv_window must be >= 0 and --kv_kernel a positive odd number")
    if not 0.0 <= args.kv_budget_floor <= 1.0:
        raise UsageError(f"--kv_budget_floor {args.kv_budget_floor} must be in [0, 1]")
    if args.head_scores is not None and args.head_scores_out is not None:
        raise UsageError("give either --head_scores or --head_scores_out, not both")
    if args.head_scores is not None and not os.path.isfile(args.head_scores):
        raise UsageError(f"--head_scores {args.head_scores}: no such file")
    if args.head_scores_out is not None:
        folder = os.path.dirname(os.path.abspath(args.head_scores_out))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise UsageError(f"--head_scores_out {args.head_scores_out}: folder is not writable")
    if args.kv_budget is not None:
        from lib import data

        data.check_available("wikitext2", "test", args.data_dir)


def kv_budgets(st: Run) -> None:
    """Stage 6b (--kv_budget, --head_scores_out): head scores, per-head budgets, continuation perplexity with the
    eviction cache (bits of stage 6 applied to the kept tokens, real cache); the budgets go into the saved
    profile."""
    from lib import data
    from lib.headscores import head_score_tensor, probe_head_scores
    from lib.io import write_json
    from lib.kvbudget import KVBudgetConfig, load_head_scores, save_head_scores
    from lib.kvevict import evaluate_budget
    from lib.models import load_processor, text_config

    args = st.args
    cfg = text_config(st.model)
    num_layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    try:
        scores, source = None, "uniform"
        if args.head_scores_out is not None:
            processor = load_processor(args.model, args.cache_dir) if st.loaded.multimodal else None
            per_sample = probe_head_scores(st.model, processor, args.head_probe, args.head_probe_samples, args.seed)
            save_head_scores(args.head_scores_out, per_sample)
            logger.info("wrote head scores (%s probe) to %s", args.head_probe, args.head_scores_out)
            scores, source = head_score_tensor(per_sample, num_layers, heads), args.head_scores_out
        elif args.head_scores is not None:
            scores, source = load_head_scores(args.head_scores, num_layers, heads), args.head_scores
        if args.kv_budget is None and st.saved_kv_budget is None:
            return
        if st.offload:
            raise UsageError("--kv_budget needs the whole model on one device (it ran with --offload)")
        positions = cfg.max_position_embeddings
        cont = args.kv_continuation or min(256, positions // 4)
        prefill = args.kv_prefill or min(2048, positions - cont)
        if prefill + cont > positions:
            raise UsageError(f"--kv_prefill {prefill} + --kv_continuation {cont} exceed the model's {positions} "
                             "positions")
        if st.saved_kv_budget is not None:  # a profile's budgets are used as saved: no scores needed
            budget = st.saved_kv_budget
        else:
            budget = KVBudgetConfig.build(args.kv_budget, num_layers, kv_heads, scores, window=args.kv_window,
                                          floor_ratio=args.kv_budget_floor, kernel=args.kv_kernel,
                                          pooling=args.kv_pooling, source=source)
        tokens = data.get_eval_tokens("wikitext2", st.tokenizer, args.data_dir, "test")
        res = evaluate_budget(st.model, tokens, budget, st.kv, prefill, cont, args.kv_segments)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    logger.info("%s: continuation perplexity %.4f (full cache %.4f), %d spans of %d+%d, cache %.3fx float16",
                budget.describe(), res["ppl_budget"], res["ppl_full"], args.kv_segments, prefill, cont,
                res["ratio_to_fp16_full"])
    if st.profile is not None:
        st.profile.kv_budget = budget.to_dict()
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        write_json(os.path.join(args.save, f"kv_budget_{st.method}.json"), res)


def run_facts(st: Run) -> dict:
    """What the run is: for a --masks run what the masks manifest says (nothing was calibrated here)."""
    args = st.args
    if st.manifest is not None:
        facts = {"model": args.model, "method": st.method, "masks": os.path.abspath(args.masks)}
        for key in ("sparsity_type", "target_sparsity", "seed", "nsamples", "calib_dataset"):
            facts[key] = st.manifest.get(key)
        facts["masks_model"] = st.manifest.get("model")
        facts["actual_sparsity"] = st.sparsity
        return facts
    calibrated = st.calib is not None  # windows were drawn (pruning, OWL or the search): say which
    return {"model": args.model, "method": st.method, "sparsity_type": str(st.pattern),
            "target_sparsity": args.sparsity_ratio, "actual_sparsity": st.sparsity, "seed": args.seed,
            "nsamples": args.nsamples if calibrated else None,
            "calib_dataset": args.calib_dataset if calibrated else None}


def save_results(st: Run) -> None:
    """Stage 8 (--save): Wanda's log line, the masks, the profile pruned with, and results_{method}.json."""
    from lib import masks as masks_lib
    from lib.io import write_json, write_text
    from lib.profile import profile_filename
    from lib.prune import profile_mean_sparsity

    args, method, kv, kv_report = st.args, st.method, st.kv, st.kv_report
    os.makedirs(args.save, exist_ok=True)
    ppl_test = st.ppl.get("wikitext2", float("nan"))
    header, row = "method\tactual_sparsity\tppl_test", f"{method}\t{st.sparsity:.4f}\t{ppl_test:.4f}"
    if kv is not None:  # Wanda's three columns first, so its parsers still read the file
        header += "\tkv_bytes_per_token\tkv_ratio_fp16"
        row += f"\t{kv_report['kv_bytes_per_token']:.1f}\t{kv_report['ratio_to_fp16']:.4f}"
    write_text(os.path.join(args.save, f"log_{method}.txt"), f"{header}\n{row}\n")
    meta = run_facts(st)
    if st.result is not None:
        masks_lib.save_masks(args.save, st.result.masks, st.result.shapes, meta)
    profile = st.profile
    if profile is not None and (method != "dense" or profile.key_bits is not None):
        profile.meta.update({"actual_sparsity": st.sparsity, "ppl": st.ppl})
        kv_avg = sum(profile.key_bits) / len(profile.key_bits) if profile.key_bits else None
        target = args.sparsity_ratio if args.sparsity_ratio is not None else profile_mean_sparsity(st.model, profile)
        name = profile_filename(method, str(st.pattern), target, kv_avg)
        write_json(os.path.join(args.save, name), profile.to_dict())
        logger.info("wrote profile %s", os.path.join(args.save, name))
    search = st.search
    write_json(os.path.join(args.save, f"results_{method}.json"), {
        **meta, "seqlen": st.seqlen, "ppl": st.ppl, "per_layer_sparsity": st.per_layer,
        "calib_seconds": st.result.calib_seconds if st.result is not None else 0.0,
        "prune_seconds": st.result.prune_seconds if st.result is not None else 0.0, "zero_shot": st.zero_shot,
        "lmms": st.lmms, "calibration": calibration_summary(st),
        "kv": None if kv is None else {**kv.to_dict(), **kv_report},
        "search": None if search is None else {
            "study_name": search.study_name, "storage": search.storage.split("@")[-1],
            **search.summary(), "files": search.files},
    })
    logger.info("wrote results to %s", args.save)


def calibration_summary(st: Run) -> dict | None:
    """Token counts of image-text calibration windows (how many of the calibration tokens are image tokens)."""
    if not st.calib or st.processor is None or getattr(st.calib[0], "mm_inputs", None) is None:
        return None
    from lib import mmdata

    image_id = st.processor.tokenizer.convert_tokens_to_ids(st.processor.image_token)
    return mmdata.window_stats(st.calib, image_id).as_dict()


def save_model(st: Run) -> None:
    """Stage 9 (--save_model): the pruned model as the checkpoint was (its dtype and config, plus zeros)."""
    from lib import models
    from lib.io import write_dir

    args = st.args
    processor = models.load_processor(args.model, args.cache_dir) if st.loaded.multimodal else None

    def fill(tmp: str) -> None:
        models.save_pretrained_as_loaded(st.loaded, tmp)
        if st.loaded.original_llava is None:  # an original LLaVA folder is copied whole, tokenizer included
            # LLaVA needs its image processor too, so the saved folder runs generate() with images as is.
            (processor or st.tokenizer).save_pretrained(tmp)
    write_dir(args.save_model, fill)
    logger.info("saved pruned model to %s", args.save_model)


def run(args) -> int:
    check_kv_budget(args)
    st = check_inputs(args)
    load(st)
    allocate(st)
    prune(st)
    if args.search == "kv":
        search_kv_bits(st)
    report_sparsity(st)
    configure_kv(st)
    if args.kv_budget is not None or args.head_scores_out is not None or st.saved_kv_budget is not None:
        kv_budgets(st)
    evaluate(st)
    if args.save:
        save_results(st)
    if args.save_model:
        save_model(st)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout,
                        force=True)
    # Library chatter (weight-loading bars, deprecation notes) is not the user's business at INFO.
    for noisy in ("transformers", "datasets", "huggingface_hub", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # transformers' own "Loading weights" bar would precede a one-line error on stderr; ours are enough.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    from lib.data import DataError
    from lib.masks import MaskError
    from lib.models import ModelLoadError
    from lib.profile import ProfileError
    from lib.search_config import SearchError

    try:
        return run(args)
    except (UsageError, ModelLoadError, DataError, ProfileError, MaskError, SearchError) as exc:
        sys.stderr.write(f"main.py: error: {exc}\n")
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
