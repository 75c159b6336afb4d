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
import time

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
                   help="how many contiguous layer blocks an original-format block profile describes")
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
    import torch

    from lib import data, masks as masks_lib, models
    from lib.eval import eval_ppl, eval_zero_shot
    from lib.io import write_dir, write_json, write_text
    from lib.profile import Profile, load_profile
    from lib.prune import (check_sparsity, profile_mean_sparsity, prune_magnitude, prune_optspa, prune_sparsegpt,
                           prune_wanda)

    pattern = validate(args)
    device = resolve_device(args.device)
    needs_calib = args.prune_method in ("wanda", "sparsegpt", "optspa") and args.masks is None
    # Fail on missing local data before spending minutes on loading the model.
    if needs_calib:
        data.check_available(args.calib_dataset, "train", args.data_dir)
    for name in args.eval_datasets:
        data.check_available(name, "test" if name == "wikitext2" else "validation", args.data_dir)

    logger.info("loading llm model %s", args.model)
    loaded = models.load_model(args.model, cache_dir=args.cache_dir, dtype=args.dtype, device=device)
    model, tokenizer = loaded.model, loaded.tokenizer
    seqlen = models.default_seqlen(model, args.seqlen)
    num_layers = len(models.decoder_layers(model))
    offload = models.should_offload(model, device, args.offload)
    models.place_model(model, device, offload)
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
            logger.info("loading calibdation data (%s, %d samples of %d tokens)", args.calib_dataset,
                        args.nsamples, seqlen)
            calib = data.get_calibration(args.calib_dataset, tokenizer, args.nsamples, args.seed, seqlen,
                                         args.data_dir)
            logger.info("dataset loading complete")
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

    logger.info("*" * 40)
    sparsity, per_layer = check_sparsity(model)
    for i, s in enumerate(per_layer):
        logger.info("layer %d sparsity %.6f", i, s)
    logger.info("sparsity sanity check %.4f", sparsity)
    logger.info("*" * 40)

    ppl = {}
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
        write_text(os.path.join(args.save, f"log_{method}.txt"),
                   f"method\tactual_sparsity\tppl_test\n{method}\t{sparsity:.4f}\t{ppl_test:.4f}\n")
        meta = {"model": args.model, "method": method, "sparsity_type": str(pattern),
                "target_sparsity": args.sparsity_ratio, "actual_sparsity": sparsity, "seed": args.seed,
                "nsamples": args.nsamples, "calib_dataset": args.calib_dataset}
        if result is not None:
            masks_lib.save_masks(args.save, result.masks, result.shapes, meta)
        if profile is not None and method != "dense":
            profile.meta.update({"actual_sparsity": sparsity, "ppl": ppl})
            write_json(os.path.join(args.save, "profile.json"), profile.to_dict())
        write_json(os.path.join(args.save, f"results_{method}.json"), {
            **meta, "seqlen": seqlen, "ppl": ppl, "per_layer_sparsity": per_layer,
            "calib_seconds": calib_seconds, "prune_seconds": prune_seconds, "zero_shot": zero_shot,
        })
        logger.info("wrote results to %s", args.save)
    if args.save_model:
        def fill(tmp: str) -> None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
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

    from lib.data import DataError
    from lib.masks import MaskError
    from lib.models import ModelLoadError
    from lib.profile import ProfileError

    try:
        return run(args)
    except (UsageError, ModelLoadError, DataError, ProfileError, MaskError) as exc:
        sys.stderr.write(f"main.py: error: {exc}\n")
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
