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
    p.add_argument("--calib_dataset", default="c4", choices=["c4", "wikitext2"], help="calibration data (default c4)")
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
    s = p.add_argument_group("layer-wise allocation and search (lib/search.py, lib/owl.py)")
    s.add_argument("--search", default=None, choices=["sparsity", "kv", "joint"],
                   help="Optuna TPE search of per-layer sparsity (--prune_method optspa), per-layer KV bits (any "
                        "method), or both; without it optspa prunes with the uniform --sparsity_ratio")
    s.add_argument("--search_granularity", default="block", choices=["block", "layer", "module"],
                   help="search one ratio per layer block (--num_blocks), per layer or per linear (default block)")
    s.add_argument("--sparsity_range", type=float, default=0.05, help="ratios searched within target +- this (0.05)")
    s.add_argument("--sparsity_step", type=float, default=0.025, help="grid step of searched ratios (0.025)")
    s.add_argument("--kv_bits_choices", type=int, nargs="+", default=[6, 8], help="KV bit-widths per layer (6 8)")
    s.add_argument("--kv_avg_bits", type=float, default=None,
                   help="KV average-bits budget (default: midway between the lowest and highest choice)")
    s.add_argument("--n_trials", type=int, default=50, help="completed trials the study should hold (default 50)")
    s.add_argument("--search_seed", type=int, default=None,
                   help="TPE sampler seed (default --seed); give workers sharing a study different ones")
    s.add_argument("--trial_mode", default="oneshot", choices=["oneshot", "sequential"],
                   help="oneshot: metric from dense activations once, each trial thresholds and evaluates; "
                        "sequential: Wanda-style recalibration per trial (default oneshot)")
    s.add_argument("--objective", default="ppl", choices=["ppl", "kl"],
                   help="trial score: validation perplexity, or KL divergence to the dense model's logits")
    s.add_argument("--objective_dataset", default="wikitext2", choices=["wikitext2", "c4"],
                   help="validation text of the trial objective (never the test split; default wikitext2)")
    s.add_argument("--objective_nsamples", type=int, default=64, help="seqlen windows of validation text per objective evaluation (64)")
    s.add_argument("--storage", default=None,
                   help="Optuna storage URL shared by workers (postgresql://, mysql://, sqlite:///, or a journal "
                        "file: journal:PATH / *.log); default sqlite file search.db in --save")
    s.add_argument("--study_name", default=None, help="study name (default from model, search, granularity, target)")
    s.add_argument("--layer_allocation", default="uniform", choices=["uniform", "owl"],
                   help="non-searched per-layer allocation: uniform, or OWL (outlier-weighted)")
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
    p.add_argument("--eval_datasets", nargs="+", default=["wikitext2"], choices=["wikitext2", "c4"],
                   help="perplexity evaluation sets (default wikitext2 test; c4 = validation)")
    p.add_argument("--eval_batch_size", type=int, default=1, help="windows per forward pass in evaluation")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block size (default 128)")
    p.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT Hessian dampening (default 0.01)")
    p.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level")
    return p


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
    if args.eval_zero_shot:
        try:
            import lm_eval  # noqa: F401
        except ImportError as exc:
            raise UsageError("--eval_zero_shot needs lm-eval-harness: pip install lm-eval") from exc
    return pattern


def search_config(args, target: float):
    from lib.search import SearchConfig

    return SearchConfig(
        target=target, kind=args.search, granularity=args.search_granularity, num_blocks=args.num_blocks or 8,
        sparsity_range=args.sparsity_range, sparsity_step=args.sparsity_step,
        kv_bits_choices=tuple(args.kv_bits_choices), kv_avg_bits=args.kv_avg_bits, n_trials=args.n_trials,
        seed=args.seed if args.search_seed is None else args.search_seed, trial_mode=args.trial_mode,
        objective=args.objective, storage=args.storage, study_name=args.study_name, save_dir=args.save,
        batch_size=args.eval_batch_size)


def validate_search(args, pattern) -> None:
    """Search and OWL flag combinations that cannot work; raises UsageError before any loading."""
    from lib.search import SearchError

    if args.search in ("sparsity", "joint"):
        if args.prune_method != "optspa":
            raise UsageError(f"--search {args.search} searches optspa sparsity; use --prune_method optspa "
                             "(--search kv works with any method)")
        if pattern.structured:
            raise UsageError(f"--search {args.search} needs unstructured sparsity ({pattern} is uniform by construction)")
        if args.sparsity_profile is not None:
            raise UsageError(f"--search {args.search} finds a profile; do not combine it with --sparsity_profile")
        if args.layer_allocation != "uniform":
            raise UsageError(f"--layer_allocation {args.layer_allocation} is a non-searched baseline; drop it or --search")
    if args.search is not None:
        if args.save is None:
            raise UsageError("--search needs --save (trials, profile, plot and the default study database go there)")
        if args.objective_nsamples < 1:
            raise UsageError("--objective_nsamples must be at least 1")
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


def load_calibration(args, tokenizer, seqlen: int):
    """The calibration windows, with Wanda's log lines (drawn once per run: search, OWL and pruning share them)."""
    from lib import data

    logger.info("loading calibdation data (%s, %d samples of %d tokens)", args.calib_dataset, args.nsamples, seqlen)
    calib = data.get_calibration(args.calib_dataset, tokenizer, args.nsamples, args.seed, seqlen, args.data_dir)
    logger.info("dataset loading complete")
    return calib


def allocate_layers(args, model, tokenizer, pattern, seqlen, device, offload):
    """Per-layer sparsity from OWL or the TPE search; returns (profile, calibration windows, search result)."""
    from lib import data, models
    from lib.owl import owl_profile
    from lib.search import dense_input_stats, run_search

    calib = load_calibration(args, tokenizer, seqlen)
    num_layers = len(models.decoder_layers(model))
    if args.layer_allocation == "owl":
        stats = dense_input_stats(model, calib, device, offload)
        profile = owl_profile(model, stats, args.sparsity_ratio, args.owl_lambda, args.owl_m,
                              sparsity_type=str(pattern))
        return profile, calib, None
    cfg = search_config(args, args.sparsity_ratio)
    if args.num_blocks is None:
        cfg.num_blocks = min(cfg.num_blocks, num_layers)
    ids = data.get_eval_tokens(args.objective_dataset, tokenizer, args.data_dir, "validation", seqlen)
    result = run_search(model, cfg, calib=calib, objective_ids=ids, seqlen=seqlen,
                        objective_nsamples=args.objective_nsamples, device=device, offload=offload,
                        model_name=args.model, kv_kwargs=kv_kwargs(args))
    result.profile.sparsity_type = str(pattern)
    return result.profile, calib, result


def search_kv(args, model, tokenizer, profile, pattern, seqlen, device, offload):
    """KV bits per layer searched on the model as it is now (pruned or dense); returns (profile, result)."""
    from lib import data, models
    from lib.profile import Profile
    from lib.search import run_search

    num_layers = len(models.decoder_layers(model))
    base = profile or Profile.uniform(num_layers, 0.0, sparsity_type=str(pattern))
    cfg = search_config(args, args.sparsity_ratio or 0.0)
    ids = data.get_eval_tokens(args.objective_dataset, tokenizer, args.data_dir, "validation", seqlen)
    result = run_search(model, cfg, calib=None, objective_ids=ids, seqlen=seqlen,
                        objective_nsamples=args.objective_nsamples, device=device, offload=offload,
                        model_name=args.model, base_profile=base, kv_kwargs=kv_kwargs(args))
    result.profile.method = args.prune_method
    return result.profile, result


def kv_kwargs(args) -> dict:
    """The --kv_* quantizer settings, shared by the KV search and the final evaluation."""
    return dict(group_size=args.kv_group_size, token_group_size=args.kv_token_group, residual=args.kv_residual,
                scheme=args.kv_scheme)


def check_kv_settings(args, model) -> None:
    """Fail before any search or pruning when the KV flags cannot fit the model (bits, layer count, groups)."""
    if args.kv_bits is not None or args.kv_profile is not None or args.search in ("kv", "joint"):
        kv_config(args, model, None, searched=args.search in ("kv", "joint"))


def kv_config(args, model, profile, searched: bool = False):
    """The KV quantization to simulate: --kv_bits or --kv_profile, else the bits a profile carries (search or
    --sparsity_profile); None when off. Records the bits in ``profile`` so the saved profile has them.
    ``searched``: also check the --kv_* settings against the model when the bits are still to be searched."""
    from lib.kvquant import KVQuantConfig, kv_dims

    num_layers, _, head_dim = kv_dims(model)
    kw = kv_kwargs(args)
    try:
        cfg = KVQuantConfig.from_cli(num_layers, kv_bits=args.kv_bits, kv_profile=args.kv_profile, **kw)
        if cfg is None and args.kv_bits is None and profile is not None and profile.key_bits is not None:
            cfg = KVQuantConfig.from_profile(profile, num_layers, **kw)
        if cfg is not None:
            cfg.validate(num_layers, head_dim)
        elif searched:
            KVQuantConfig.uniform(8, num_layers, **kw).validate(num_layers, head_dim)
    except ValueError as exc:
        raise UsageError(f"KV quantization: {exc}") from exc
    if cfg is not None and profile is not None:
        profile.key_bits, profile.value_bits = list(cfg.key_bits), list(cfg.value_bits)
    return cfg


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


def run(args) -> int:
    from lib import data, masks as masks_lib, models
    from lib.eval import eval_ppl, eval_zero_shot
    from lib.io import write_dir, write_json, write_text
    from lib.profile import Profile, load_profile
    from lib.prune import (check_sparsity, profile_mean_sparsity, prune_magnitude, prune_optspa, prune_sparsegpt,
                           prune_wanda)

    pattern = validate(args)
    device = resolve_device(args.device)
    needs_calib = (args.prune_method in ("wanda", "sparsegpt", "optspa") and args.masks is None) or \
        args.layer_allocation == "owl" or args.search in ("sparsity", "joint")
    # Fail on missing local data before spending minutes on loading the model.
    if needs_calib:
        data.check_available(args.calib_dataset, "train", args.data_dir)
    for name in args.eval_datasets:
        data.check_available(name, "test" if name == "wikitext2" else "validation", args.data_dir)
    if args.search is not None:
        data.check_available(args.objective_dataset, "validation", args.data_dir)

    logger.info("loading llm model %s", args.model)
    loaded = models.load_model(args.model, cache_dir=args.cache_dir, dtype=args.dtype, device=device)
    model, tokenizer = loaded.model, loaded.tokenizer
    seqlen = models.default_seqlen(model, args.seqlen)
    num_layers = len(models.decoder_layers(model))
    offload = models.should_offload(model, device, args.offload)
    models.place_model(model, device, offload)
    check_kv_settings(args, model)
    if args.search in ("sparsity", "joint") and args.search_granularity == "block" and \
            args.num_blocks is not None and args.num_blocks > num_layers:
        raise UsageError(f"--num_blocks {args.num_blocks} is more than the model's {num_layers} decoder layers")
    logger.info("use device %s (dtype %s, offload %s, seqlen %d)", device, next(model.parameters()).dtype,
                offload, seqlen)

    profile = None
    if args.sparsity_profile is not None:
        profile = load_profile(args.sparsity_profile, num_layers, args.num_blocks)
        module_names = list(models.find_linears(models.decoder_layers(model)[0]))
        profile.validate(num_layers, module_names)
        if pattern.structured and not all(
            abs(profile.ratio(i, n) - pattern.ratio) < 1e-9 for i in range(num_layers) for n in module_names
        ):
            raise UsageError(f"{pattern} sparsity is uniform by construction; the profile varies its ratios")
        profile.sparsity_type = str(pattern)
    elif args.sparsity_ratio is not None:
        profile = Profile.uniform(num_layers, args.sparsity_ratio, sparsity_type=str(pattern))
    calib = search = None
    if args.search in ("sparsity", "joint") or args.layer_allocation == "owl":
        profile, calib, search = allocate_layers(args, model, tokenizer, pattern, seqlen, device, offload)
    method = args.prune_method
    result = None
    calib_seconds = prune_seconds = 0.0
    if args.masks is not None:
        saved, manifest = masks_lib.load_masks(args.masks)
        masks_lib.apply_masks(model, saved, models.pruned_weight_names(model))
        method = manifest.get("method", "masks")
        logger.info("applied %d saved masks from %s (method %s)", len(saved), args.masks, method)
    elif method != "dense" and profile is not None:
        profile.model, profile.method = args.model, method
        logger.info("pruning starts: %s, target sparsity %.4f, %s", method,
                    profile_mean_sparsity(model, profile), pattern)
        if method == "magnitude":
            result = prune_magnitude(model, profile, pattern, device, offload)
        else:
            if calib is None:  # the search or OWL may have drawn it already
                calib = load_calibration(args, tokenizer, seqlen)
            if method == "wanda":
                result = prune_wanda(model, calib, profile, pattern, device, offload, use_variant=args.use_variant)
            elif method == "optspa":
                result = prune_optspa(model, calib, profile, pattern, device, offload)
            else:
                result = prune_sparsegpt(model, calib, profile, pattern, device, offload, args.blocksize,
                                         args.percdamp)
        calib_seconds, prune_seconds = result.calib_seconds, result.prune_seconds
        logger.info("pruning done: %.2f s calibration forward passes, %.2f s metric and masks",
                    calib_seconds, prune_seconds)
    if args.search == "kv":  # KV bits are searched on the model as pruned
        profile, search = search_kv(args, model, tokenizer, profile, pattern, seqlen, device, offload)

    logger.info("*" * 40)
    sparsity, per_layer = check_sparsity(model)
    for i, s in enumerate(per_layer):
        logger.info("layer %d sparsity %.6f", i, s)
    logger.info("sparsity sanity check %.4f", sparsity)
    logger.info("*" * 40)

    ppl = {}
    from lib.kvquant import kv_memory_report, simulate_kv_quant

    kv = kv_config(args, model, profile)
    kv_report = kv_memory_report(kv, model)
    if kv is not None:
        logger.info("KV cache %s: %.1f bytes per token, %.3fx float16", kv.describe(),
                    kv_report["kv_bytes_per_token"], kv_report["ratio_to_fp16"])
    with simulate_kv_quant(model, kv):
        for name in args.eval_datasets:
            ids = data.get_eval_tokens(name, tokenizer, args.data_dir, "test", seqlen)
            ppl[name] = eval_ppl(model, ids, seqlen, device, args.eval_batch_size, offload, desc=f"{name} ppl")
            logger.info("%s perplexity %.4f", "wikitext" if name == "wikitext2" else name, ppl[name])

    zero_shot = None
    if args.eval_zero_shot:
        zero_shot = eval_zero_shot(model, tokenizer)
        logger.info("zero-shot results: %s", json.dumps(zero_shot, default=str))

    if args.save:
        os.makedirs(args.save, exist_ok=True)
        ppl_test = ppl.get("wikitext2", float("nan"))
        header, row = "method\tactual_sparsity\tppl_test", f"{method}\t{sparsity:.4f}\t{ppl_test:.4f}"
        if kv is not None:  # Wanda's three columns first, so its parsers still read the file
            header += "\tkv_bytes_per_token\tkv_ratio_fp16"
            row += f"\t{kv_report['kv_bytes_per_token']:.1f}\t{kv_report['ratio_to_fp16']:.4f}"
        write_text(os.path.join(args.save, f"log_{method}.txt"), f"{header}\n{row}\n")
        meta = {"model": args.model, "method": method, "sparsity_type": str(pattern),
                "target_sparsity": args.sparsity_ratio, "actual_sparsity": sparsity, "seed": args.seed,
                "nsamples": args.nsamples, "calib_dataset": args.calib_dataset}
        if result is not None:
            masks_lib.save_masks(args.save, result.masks, result.shapes, meta)
        if profile is not None and (method != "dense" or profile.key_bits is not None):
            from lib.profile import profile_filename

            profile.meta.update({"actual_sparsity": sparsity, "ppl": ppl})
            kv_avg = sum(profile.key_bits) / len(profile.key_bits) if profile.key_bits else None
            target = args.sparsity_ratio if args.sparsity_ratio is not None else profile_mean_sparsity(model, profile)
            name = profile_filename(method, str(pattern), target, kv_avg)
            write_json(os.path.join(args.save, name), profile.to_dict())
            logger.info("wrote profile %s", os.path.join(args.save, name))
        write_json(os.path.join(args.save, f"results_{method}.json"), {
            **meta, "seqlen": seqlen, "ppl": ppl, "per_layer_sparsity": per_layer,
            "calib_seconds": calib_seconds, "prune_seconds": prune_seconds, "zero_shot": zero_shot,
            "kv": None if kv is None else {**kv.to_dict(), **kv_report},
            "search": None if search is None else {
                "study_name": search.study_name, "storage": search.storage.split("@")[-1],
                "best_value": search.best_value, "seconds": search.seconds, "wasted_fraction": search.wasted_fraction,
                "files": search.files},
        })
        logger.info("wrote results to %s", args.save)
    if args.save_model:
        processor = models.load_processor(args.model, args.cache_dir) if loaded.multimodal else None

        def fill(tmp: str) -> None:
            model.save_pretrained(tmp)
            # LLaVA needs its image processor too, so the saved folder runs generate() with images as is.
            (processor or tokenizer).save_pretrained(tmp)
        model.to("cpu")
        write_dir(args.save_model, fill)
        logger.info("saved pruned model to %s", args.save_model)
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
    from lib.search import SearchError

    try:
        return run(args)
    except (UsageError, ModelLoadError, DataError, ProfileError, MaskError, SearchError) as exc:
        sys.stderr.write(f"main.py: error: {exc}\n")
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
