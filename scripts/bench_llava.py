#!/usr/bin/env python
"""LLaVA benchmark on the offline testbed (llava-c4-5m: a LLaVA-1.5-layout wrapper, random 2-layer CLIP tower,
the trained llama-c4-5m language model) with image-text calibration in LLaVA's conversation format.

Every stage runs in its own child process, so wall seconds and peak RSS are per stage:
  * calib_prune: image-text calibration windows (the testbed's questions as LLaVA conversations, llava_v1
    template), image-token share of the calibration tokens, Optspa 50% pruned on them, and the
    image-conditioned perplexity (text tokens of the image windows) dense / image-calibrated / c4-calibrated;
  * search: ``main.py --search sparsity`` with the image-text calibration set, end to end;
  * kv: greedy generation with an image prompt, real packed cache vs simulation hooks, bytes per token;
  * lmms: lmms-eval (if installed) on a local VQA task over the testbed questions, through the adapter.

Usage:  python scripts/bench_llava.py --out scripts/results/llava_cpu.json --readme README.md
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TESTBED = "/work/shared/testbed"
logger = logging.getLogger("bench_llava")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=f"{TESTBED}/llava-c4-5m")
    p.add_argument("--images", default=f"{TESTBED}/images")
    p.add_argument("--data_dir", default=f"{TESTBED}/data")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--n_trials", type=int, default=10)
    p.add_argument("--objective_nsamples", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stages", nargs="+", default=["calib_prune", "search", "kv", "lmms"])
    p.add_argument("--out", default="scripts/results/llava_cpu.json")
    p.add_argument("--readme", default=None, help="write the table between the bench_llava markers of this file")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # internal: run one stage in this process
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------- stages
def stage_calib_prune(args, conv: str) -> dict:
    from lib import mmdata
    from lib.data import get_calibration
    from lib.models import decoder_layers, load_model, load_processor
    from lib.profile import Profile
    from lib.prune import prune_optspa
    from lib.sparsity import SparsityType

    out = {}
    t0 = time.perf_counter()
    lm = load_model(args.model, dtype="float32")
    proc = load_processor(args.model)
    img_id = lm.model.config.image_token_index
    out["load_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    wins = mmdata.get_image_text_calibration(conv, proc, args.nsamples, 0, args.seqlen, img_id,
                                             image_dir=args.images)
    out["windows_s"] = round(time.perf_counter() - t0, 2)
    out["calibration"] = mmdata.window_stats(wins, img_id).as_dict()
    held = mmdata.get_image_text_calibration(conv, proc, 12, 1, args.seqlen, img_id, image_dir=args.images)

    def image_ppl(model) -> float:
        total, count = mmdata.image_text_nll(model, held, "cpu")
        return round(math.exp(total / count), 3)

    out["image_ppl_dense"] = image_ppl(lm.model)
    n = len(decoder_layers(lm.model))
    t0 = time.perf_counter()
    res = prune_optspa(lm.model, wins, Profile.uniform(n, args.sparsity), SparsityType(), "cpu")
    out["prune_image_calib_s"] = round(time.perf_counter() - t0, 2)
    out["prune_image_calib_calib_s"] = round(res.calib_seconds, 2)
    out["image_ppl_optspa_image_calib"] = image_ppl(lm.model)
    # the same pruning calibrated on c4 text windows of the same count, for comparison
    lm2 = load_model(args.model, dtype="float32")
    text = get_calibration("c4", lm2.tokenizer, args.nsamples, 0, args.seqlen, args.data_dir)
    t0 = time.perf_counter()
    prune_optspa(lm2.model, text, Profile.uniform(n, args.sparsity), SparsityType(), "cpu")
    out["prune_c4_calib_s"] = round(time.perf_counter() - t0, 2)
    out["c4_calibration_tokens"] = sum(int(w.numel()) for w in text)
    out["image_ppl_optspa_c4_calib"] = image_ppl(lm2.model)
    out["held_out"] = "12 windows drawn with seed 1 from the same 6 records (the testbed has 6 questions)"
    return out


def stage_search(args, conv: str) -> dict:
    save = os.path.join(args.work, "search")
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--model", args.model, "--data_dir", args.data_dir,
           "--calib_dataset", conv, "--image_dir", args.images, "--nsamples", str(args.nsamples),
           "--seqlen", str(args.seqlen), "--prune_method", "optspa", "--sparsity_ratio", str(args.sparsity),
           "--search", "sparsity", "--search_granularity", "layer", "--n_trials", str(args.n_trials),
           "--objective_nsamples", str(args.objective_nsamples), "--device", "cpu", "--save", save]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = {"command": " ".join(cmd[1:]).replace(ROOT + "/", ""), "exit": proc.returncode, "wall_s": round(wall, 2),
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}
    if proc.returncode != 0:
        out["stderr_tail"] = proc.stderr.strip().splitlines()[-3:]
        return out
    res = [f for f in os.listdir(save) if f.startswith("results_") and f.endswith(".json")]
    if res:
        with open(os.path.join(save, res[0])) as f:
            data = json.load(f)
        for k in ("ppl", "ppl_test", "sparsity", "search", "calibration"):
            if k in data:
                out[k] = data[k]
    out["log_tail"] = [line for line in proc.stdout.splitlines() if "calibration" in line or "ppl" in line][-6:]
    return out


def stage_kv(args, conv: str) -> dict:
    from PIL import Image

    from lib.kvquant import KVQuantConfig
    from lib.mmkv import image_prompt_kv
    from lib.models import decoder_layers, load_model, load_processor

    lm = load_model(args.model, dtype="float32")
    proc = load_processor(args.model)
    img = Image.open(os.path.join(args.images, "coco_000000039769.png")).convert("RGB")
    text = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
    n = len(decoder_layers(lm.model))
    out = {}
    for bits in (8, 4):
        cfg = KVQuantConfig.uniform(bits, n, residual=0)
        t0 = time.perf_counter()
        rep = image_prompt_kv(lm.model, proc, img, text, cfg, max_new_tokens=32)
        rep["seconds"] = round(time.perf_counter() - t0, 2)
        rep.pop("text", None)
        out[f"kivi_{bits}bit"] = rep
    return out


def stage_lmms(args, conv: str) -> dict:
    try:
        from lib import lmms_adapter

        lmms_adapter.require_lmms()
    except Exception as exc:  # optional dependency
        return {"skipped": str(exc)}
    from lib.models import decoder_layers, load_model, load_processor
    from lib.profile import Profile
    from lib.prune import prune_magnitude
    from lib.sparsity import SparsityType

    task = lmms_adapter.write_vqa_task(os.path.join(args.images, "questions.jsonl"), args.images,
                                       os.path.join(args.work, "lmms_task"), name="testbed_vqa")
    lm = load_model(args.model, dtype="float32")
    proc = load_processor(args.model)
    out = {}
    t0 = time.perf_counter()
    out["dense"] = lmms_adapter.evaluate(lm.model, proc, ["testbed_vqa"], include_path=task)["testbed_vqa"]
    out["dense_s"] = round(time.perf_counter() - t0, 2)
    prune_magnitude(lm.model, Profile.uniform(len(decoder_layers(lm.model)), args.sparsity), SparsityType())
    t0 = time.perf_counter()
    out["magnitude_pruned"] = lmms_adapter.evaluate(lm.model, proc, ["testbed_vqa"], include_path=task)["testbed_vqa"]
    out["pruned_s"] = round(time.perf_counter() - t0, 2)
    out["note"] = "random vision tower: answers are meaningless, the numbers show the path runs"
    return out


def markdown(result: dict) -> str:
    """The README table for a result file (tests/test_mmcalib.py checks the README holds exactly this)."""
    st = result["stages"]
    lines = [f"Model `{result['model']}`, {result['nsamples']} image-text calibration windows (seqlen cap "
             f"{result['seqlen']}), Optspa {result['sparsity']:.0%}. Machine: {result['machine']}.", "",
             "| stage | result | wall s | peak RSS MiB |", "|---|---|---|---|"]
    cp = st.get("calib_prune")
    if cp and "calibration" in cp:
        c = cp["calibration"]
        lines.append(f"| image-text calibration + Optspa prune | {c['windows']} windows of {c['min_len']}-{c['max_len']} "
                     f"tokens, {c['image_tokens']} of {c['tokens']} calibration tokens are image tokens "
                     f"({c['image_token_share']:.1%}, {c['image_tokens_per_window']:g} per window); prune "
                     f"{cp['prune_image_calib_s']:.1f} s | {cp['wall_s']:.1f} | {cp['peak_rss_mib']:.0f} |")
        lines.append(f"| image-conditioned ppl (text tokens of 12 windows drawn with seed 1 from the same 6 records) | dense {cp['image_ppl_dense']:.2f}; "
                     f"Optspa calibrated on image-text {cp['image_ppl_optspa_image_calib']:.2f}, on c4 text "
                     f"{cp['image_ppl_optspa_c4_calib']:.2f} ({cp['c4_calibration_tokens']} c4 tokens) |  |  |")
    se = st.get("search")
    if se and se.get("exit") == 0:
        s = se.get("search") or {}
        parts = []
        if "complete_trials" in s:
            parts.append(f"{s['complete_trials']} trials complete, {s.get('pruned_trials', 0)} stopped early")
        if "best_value" in s:
            parts.append(f"best WikiText-2 validation ppl {s['best_value']:.2f}")
        if "seconds" in s:
            parts.append(f"search {s['seconds']:.0f} s")
        if (se.get("ppl") or {}).get("wikitext2") is not None:
            parts.append(f"WikiText-2 test ppl {se['ppl']['wikitext2']:.2f} (all windows)")
        lines.append(f"| `main.py --search sparsity` (layer, {s.get('complete_trials', 0) + s.get('pruned_trials', 0)} "
                     f"trials) on the image-text calibration | {'; '.join(parts)} | {se['wall_s']:.1f} | "
                     f"{se['peak_rss_mib']:.0f} |")
    elif se:
        lines.append(f"| `main.py --search sparsity` on image-text calibration | failed: "
                     f"{' '.join(se.get('stderr_tail') or se.get('error') or [])[:120]} |  |  |")
    kv = st.get("kv")
    if kv and "kivi_4bit" in kv:
        for bits in (8, 4):
            r = kv[f"kivi_{bits}bit"]
            lines.append(f"| packed KV cache, {bits}-bit kivi, image prompt | {r['prompt_tokens']} prompt tokens "
                         f"({r['image_tokens']} image) + {r['generated_tokens']} generated: "
                         f"{r['kv_bytes_per_token_measured']:.0f} bytes/token stored ({r['ratio_to_fp16']:.3f}x "
                         f"float16); greedy real cache == simulation: {r['real_equals_simulation']} | "
                         f"{r['seconds']:.1f} |  |")
    lm = st.get("lmms")
    if lm and "dense" in lm:
        lines.append(f"| lmms-eval, local VQA task (6 testbed questions) | VQA accuracy dense "
                     f"{lm['dense']['vqa_accuracy']:.2f}, magnitude-pruned {lm['magnitude_pruned']['vqa_accuracy']:.2f} "
                     f"(random vision tower: only shows the path runs) | {lm['wall_s']:.1f} | {lm['peak_rss_mib']:.0f} |")
    elif lm:
        lines.append(f"| lmms-eval | skipped: {lm.get('skipped', '')} |  |  |")
    lines += ["", f"Total benchmark wall time {result['total_wall_s']:.0f} s."]
    return "\n".join(lines)


def write_readme(readme: str, result: dict) -> None:
    import re

    text = open(readme, encoding="utf-8").read()
    new, n = re.subn(r"(<!-- bench_llava:start -->\n).*?(\n<!-- bench_llava:end -->)",
                     lambda m: m.group(1) + markdown(result) + m.group(2), text, flags=re.S)
    if n != 1:
        raise SystemExit(f"{readme} lacks the bench_llava markers")
    with open(readme, "w", encoding="utf-8") as f:
        f.write(new)


STAGES = {"calib_prune": stage_calib_prune, "search": stage_search, "kv": stage_kv, "lmms": stage_lmms}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.stage:  # child: one stage, JSON on the last stdout line
        import torch

        torch.set_num_threads(args.threads)
        conv = os.path.join(args.work, "conversations.json")
        t0 = time.perf_counter()
        res = STAGES[args.stage](args, conv)
        res.setdefault("wall_s", round(time.perf_counter() - t0, 2))
        res.setdefault("peak_rss_mib", round(peak_rss_mib(), 1))
        print(json.dumps(res))
        return 0
    import torch
    import transformers

    work = tempfile.mkdtemp(prefix="bench-llava-")
    from lib.mmdata import conversations_from_questions

    conversations_from_questions(os.path.join(args.images, "questions.jsonl"), os.path.join(work, "conversations.json"))
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                         f"transformers {transformers.__version__}, {args.threads} threads",
              "model": os.path.basename(args.model), "nsamples": args.nsamples, "seqlen": args.seqlen,
              "sparsity": args.sparsity, "stages": {}}
    start = time.perf_counter()
    for stage in args.stages:
        cmd = [sys.executable, os.path.abspath(__file__), "--stage", stage, "--work", work] + \
              [a for a in (argv if argv is not None else sys.argv[1:])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            result["stages"][stage] = {"error": proc.stderr.strip().splitlines()[-3:]}
        else:
            result["stages"][stage] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(stage, json.dumps(result["stages"][stage])[:400], flush=True)
    result["total_wall_s"] = round(time.perf_counter() - start, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    if args.readme:
        write_readme(args.readme, result)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
