#!/usr/bin/env python
"""Benchmark head-wise KV budgets (SparseMM allocation + SnapKV eviction, lib/kvevict.py) on SmolLM2-135M.

Measures, in one run:
  * head scores of the text model by the copy/retrieval probe (lib/headscores.py), saved in SparseMM's layout;
  * long-context continuation quality: for ``--segments`` spans of WikiText-2 test (evenly spaced, disjoint),
    prefill ``--prefill`` tokens once (full attention), then score the next ``--continuation`` tokens
    teacher-forced with each cache: the full cache, uniform SnapKV and head-score budgets at ``--budgets``
    tokens per KV head (window included), each with kept tokens unquantized / 8-bit / 4-bit (kivi); pooled
    perplexity over all segments, and the real ``nbytes()`` of each cache right after the prefill against a
    float16 full cache;
  * decode speed at ``--prefill`` context: greedy steps with DynamicCache vs the eviction cache (interleaved
    rounds, prefill states reused so only decode steps are timed);
  * a LLaVA smoke test on the testbed's llava-c4-5m: visual-head probe on generated probe images, then generate
    with an image through the eviction cache.

Usage:  python scripts/bench_kvbudget.py --out scripts/results/kvbudget_cpu.json --readme README.md
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import re
import statistics
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib.data import get_eval_tokens  # noqa: E402
from lib.headscores import copy_head_scores, head_score_tensor, visual_head_scores  # noqa: E402
from lib.kvbudget import KVBudgetConfig, scores_to_json  # noqa: E402
from lib.kvevict import (  # noqa: E402
    EvictionKVCache,
    continuation_nll,
    dynamic_cache_from_prefill,
    capture_prefill,
    keep_all_budget,
    kv_budget_attention,
)
from lib.kvquant import KVQuantConfig, fp16_kv_bytes_per_token, kv_dims  # noqa: E402
from lib.probe_images import generate_probe_images  # noqa: E402

logger = logging.getLogger("bench_kvbudget")
TESTBED = "/work/shared/testbed"
MARK = "bench_kvbudget"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.expanduser("~/.cache/optspa-testbed/smollm2-135m"))
    p.add_argument("--llava", default=f"{TESTBED}/llava-c4-5m", help="'' to skip the LLaVA smoke test")
    p.add_argument("--data_dir", default=f"{TESTBED}/data")
    p.add_argument("--out", default="scripts/results/kvbudget_cpu.json")
    p.add_argument("--readme", default=None, help="replace the table between the bench_kvbudget markers")
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--continuation", type=int, default=256)
    p.add_argument("--segments", type=int, default=6)
    p.add_argument("--budgets", default="64,128,256,512")
    p.add_argument("--bits", default="16,8,4")
    p.add_argument("--window", type=int, default=32, help="observation window of the decode-speed caches")
    p.add_argument("--windows", default="32,half",
                   help="observation windows of the quality table: token counts, or 'half' (half the budget)")
    p.add_argument("--kernel", type=int, default=7)
    p.add_argument("--pooling", default="maxpool")
    p.add_argument("--floor_ratio", type=float, default=0.1)
    p.add_argument("--group_size", type=int, default=32)
    p.add_argument("--token_group_size", type=int, default=32)
    p.add_argument("--probe_samples", type=int, default=8)
    p.add_argument("--probe_length", type=int, default=128)
    p.add_argument("--decode_tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--decode_budget", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--speed_only", action="store_true",
                   help="re-measure only decode speed (head scores from --out) and update --out")
    p.add_argument("--speed_threads", type=int, default=1,
                   help="torch threads while timing decode (1: CPU time then excludes time other jobs hold the core)")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only re-render the table (and --readme) from a result file of an earlier run")
    return p.parse_args()


# ------------------------------------------------------------------------------------------------ quality
def window_for(policy: str, budget: int) -> int:
    """The observation window (always kept, counted in the budget) of a window policy: a token count, or 'half'."""
    window = budget // 2 if policy == "half" else int(policy)
    if not 0 <= window <= budget:
        raise SystemExit(f"window {policy} does not fit a budget of {budget}")
    return window


def quality(model, tokens: torch.Tensor, scores: torch.Tensor, args) -> dict:
    num_layers, kv_heads, head_dim = kv_dims(model)
    span = args.prefill + args.continuation
    n = tokens.shape[1]
    if n < args.segments * span:
        raise SystemExit(f"{n} tokens cannot hold {args.segments} disjoint spans of {span}")
    stride = (n - span) // max(args.segments - 1, 1)
    starts = [i * stride for i in range(args.segments)]
    bits = [int(b) for b in args.bits.split(",")]
    kv = {b: None if b >= 16 else KVQuantConfig.uniform(b, num_layers, group_size=args.group_size,
                                                         token_group_size=args.token_group_size) for b in bits}
    sel = dict(kernel=args.kernel, pooling=args.pooling, floor_ratio=args.floor_ratio)
    budgets = {}
    for budget in (int(b) for b in args.budgets.split(",")):
        seen = set()
        for policy in args.windows.split(","):
            window = window_for(policy, budget)
            if window in seen:  # e.g. 'half' of 64 is 32: measured once
                continue
            seen.add(window)
            budgets[("snapkv", budget, policy)] = KVBudgetConfig.build(budget, num_layers, kv_heads, None,
                                                                       window=window, **sel)
            budgets[("headscore", budget, policy)] = KVBudgetConfig.build(budget, num_layers, kv_heads, scores,
                                                                          window=window, source="copy probe", **sel)
    capture = max(cfg.window for cfg in budgets.values())  # one prefill serves every window (last queries kept)
    full = keep_all_budget(num_layers, kv_heads, capture)
    makers: dict = {}
    rows: dict = {}
    for b in bits:
        key = f"full|-|{b}|-"
        rows[key] = {"method": "full", "budget": None, "bits": b, "window": None}
        if kv[b] is None:
            makers[key] = lambda st: dynamic_cache_from_prefill(st)
        else:
            makers[key] = lambda st, c=kv[b]: EvictionKVCache.from_prefill(full, st, kv_config=c)
    for (method, budget, policy), cfg in budgets.items():
        for b in bits:
            key = f"{method}|{budget}|{b}|{policy}"
            rows[key] = {"method": method, "budget": budget, "bits": b, "window": cfg.window, "policy": policy}
            makers[key] = lambda st, c=cfg, q=kv[b]: EvictionKVCache.from_prefill(c, st, kv_config=q)
    per_segment = []
    for i, s in enumerate(starts):
        t0 = time.perf_counter()
        res = continuation_nll(model, tokens[:, s : s + span], args.prefill, makers, window=capture)
        per_segment.append({"start": s, "seconds": round(time.perf_counter() - t0, 1), "rows": res})
        logger.info("segment %d/%d at %d: full ppl %.3f (%.0fs)", i + 1, len(starts), s,
                    math.exp(res["full|-|16|-"]["nll"] / res["full|-|16|-"]["tokens"]), per_segment[-1]["seconds"])
    fp16_full = fp16_kv_bytes_per_token(num_layers, kv_heads, head_dim) * args.prefill
    for key, row in rows.items():
        nll = sum(seg["rows"][key]["nll"] for seg in per_segment)
        ntok = sum(seg["rows"][key]["tokens"] for seg in per_segment)
        row["ppl"] = math.exp(nll / ntok)
        row["segment_ppl"] = [math.exp(seg["rows"][key]["nll"] / seg["rows"][key]["tokens"]) for seg in per_segment]
        row["nbytes"] = statistics.mean(seg["rows"][key]["nbytes"] for seg in per_segment)
        row["ratio_to_fp16_full"] = row["nbytes"] / fp16_full
    base = rows["full|-|16|-"]["ppl"]
    for row in rows.values():
        row["ppl_vs_full_pct"] = 100.0 * (row["ppl"] - base) / base
    return {"segments": starts, "span": span, "fp16_full_bytes": fp16_full, "rows": rows,
            "capacities": {f"{m}|{b}|{w}": cfg.to_dict() for (m, b, w), cfg in budgets.items()},
            "per_segment_seconds": [s["seconds"] for s in per_segment]}


# ------------------------------------------------------------------------------------------------ speed
def _decode(model, cache, first: torch.Tensor, steps: int) -> tuple[float, float]:
    """(wall tokens/s, CPU-time tokens/s) of ``steps`` greedy decode steps."""
    tok = first
    with torch.inference_mode(), kv_budget_attention(model):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            logits = model(tok, past_key_values=cache, use_cache=True).logits[:, -1]
            tok = logits.argmax(-1, keepdim=True)
        return steps / (time.perf_counter() - t0), steps / (time.process_time() - c0)


def speed(model, tokens: torch.Tensor, scores: torch.Tensor, args) -> dict:
    num_layers, kv_heads, _ = kv_dims(model)
    states, logits = capture_prefill(model, tokens[:, : args.prefill], args.window)
    first = logits[:, -1].argmax(-1, keepdim=True)
    sel = dict(window=args.window, kernel=args.kernel, pooling=args.pooling, floor_ratio=args.floor_ratio)
    hs = KVBudgetConfig.build(args.decode_budget, num_layers, kv_heads, scores, **sel)
    snap = KVBudgetConfig.build(args.decode_budget, num_layers, kv_heads, None, **sel)
    kv8 = KVQuantConfig.uniform(8, num_layers, group_size=args.group_size, token_group_size=args.token_group_size)
    methods = {
        "DynamicCache": lambda: dynamic_cache_from_prefill(states),
        f"SnapKV {args.decode_budget}": lambda: EvictionKVCache.from_prefill(snap, states),
        f"head-score {args.decode_budget}": lambda: EvictionKVCache.from_prefill(hs, states),
        f"head-score {args.decode_budget} + 8 bit": lambda: EvictionKVCache.from_prefill(hs, states, kv_config=kv8),
    }
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
    threads = torch.get_num_threads()
    torch.set_num_threads(args.speed_threads)
    try:
        for name, make in methods.items():  # warm-up
            _decode(model, make(), first, 4)
        for _ in range(args.rounds):  # interleaved, so load changes hit every method alike
            for name, make in methods.items():
                rates[name].append(_decode(model, make(), first, args.decode_tokens))
    finally:
        torch.set_num_threads(threads)
    base = rates["DynamicCache"]
    out = {}
    for name, r in rates.items():
        out[name] = {"tokens_per_s": statistics.median(x[0] for x in r),
                     "cpu_tokens_per_s": statistics.median(x[1] for x in r),
                     # paired per round against DynamicCache: CPU time (robust to other jobs), and wall time
                     "speed_vs_dynamic": statistics.median(x[1] / b[1] for x, b in zip(r, base)),
                     "wall_speed_vs_dynamic": statistics.median(x[0] / b[0] for x, b in zip(r, base)),
                     "threads": args.speed_threads,
                     "all_rounds_wall": [round(x[0], 2) for x in r], "all_rounds_cpu": [round(x[1], 2) for x in r]}
    return out


# ------------------------------------------------------------------------------------------------ llava
def llava_smoke(path: str, args) -> dict:
    from PIL import Image
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    proc = LlavaProcessor.from_pretrained(path)
    num_layers, kv_heads, _ = kv_dims(model)
    size = proc.image_processor.crop_size["height"]
    samples = generate_probe_images(4, size=size, words_per_image=2, seed=0)
    per_sample = visual_head_scores(model, proc, samples, max_new_tokens=16, min_chars=2)
    cfg = model.config.text_config
    scores = head_score_tensor(per_sample, num_layers, cfg.num_attention_heads)
    image = Image.open(f"{TESTBED}/images/coco_000000039769.png").convert("RGB")
    inputs = proc(text="USER: <image>\nHow many cats are there? ASSISTANT:", images=image, return_tensors="pt")
    prompt_len = int(inputs["input_ids"].shape[1])
    budget = KVBudgetConfig.build(24, num_layers, kv_heads, scores if float(scores.sum()) > 0 else None, window=8)
    kv = KVQuantConfig.uniform(4, num_layers, group_size=32, token_group_size=8)
    with kv_budget_attention(model):
        cache = EvictionKVCache.for_model(model, budget, kv_config=kv)
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=8, do_sample=False)
    return {"prompt_tokens": prompt_len, "generated": int(out.shape[1] - prompt_len),
            "visual_head_score_total": float(scores.sum()),
            "kept_lengths_equal_allocation": cache.kept_lengths() == (budget.kept(prompt_len) + 7).tolist(),
            "cache_nbytes": cache.nbytes()}


# ------------------------------------------------------------------------------------------------ report
def _key(method: str, budget, bits: int, policy) -> str:
    return f"{method}|{budget if budget is not None else '-'}|{bits}|{policy if policy is not None else '-'}"


def _twin(rows: dict, r: dict) -> dict:
    """The uniform SnapKV row a head-score row is compared with (same budget, bits and window)."""
    return rows[_key("snapkv", r["budget"], r["bits"], r["policy"])]


def markdown(res: dict) -> str:
    q = res["quality"]
    rows = q["rows"]
    args = res["args"]
    bits = sorted({r["bits"] for r in rows.values()}, reverse=True)
    label = {16: "unquantized", 8: "8-bit", 4: "4-bit"}
    lines = [f"Model `{os.path.basename(res['model'])}` ({res['num_layers']} layers, {res['kv_heads']} KV heads, "
             f"head dim {res['head_dim']}), float32 on CPU; WikiText-2 test, {len(q['segments'])} disjoint spans: "
             f"prefill {args['prefill']} tokens, then {args['continuation']} tokens scored "
             f"teacher-forced through the cache (pooled perplexity). Budget = tokens kept per KV head including the "
             f"observation window (the most recent tokens, always kept; its queries score the rest), which is "
             f"{' or '.join(w + ' tokens' if w != 'half' else 'half the budget' for w in args['windows'].split(','))}; "
             f"selection {args['pooling']} {args['kernel']}; head-score floor ratio {args['floor_ratio']}; quantized "
             f"rows: kivi, group {args['group_size']}, key token group {args['token_group_size']}. Bytes: real "
             f"`nbytes()` after the prefill / a float16 full cache of {q['fp16_full_bytes'] / 2**20:.1f} MiB "
             "(unquantized rows are held in the model's float32).", ""]
    head = "| budget | window | method | " + " | ".join(f"ppl {label.get(b, b)} (Δ full) | × fp16 full"
                                                       for b in bits) + " |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    combos = {(r["method"], r["budget"], r["policy"], r["window"]) for r in rows.values() if r["method"] != "full"}
    order = [("full", None, None, None)] + sorted(combos, key=lambda x: (x[1], x[3], x[0] != "snapkv"))
    names = {"full": "full cache", "snapkv": "SnapKV (uniform)", "headscore": "head-score (SparseMM)"}
    for method, budget, policy, window in order:
        cells = []
        for b in bits:
            r = rows[_key(method, budget, b, policy)]
            cells.append(f"{r['ppl']:.3f} ({r['ppl_vs_full_pct']:+.2f}%) | {r['ratio_to_fp16_full']:.3f}")
        lines.append(f"| {budget if budget is not None else 'all'} | {window if window is not None else '-'} | "
                     f"{names[method]} | " + " | ".join(cells) + " |")
    sp = res["speed"]
    threads = next(iter(sp.values())).get("threads", res["env"]["threads"])
    lines += ["", f"Decode at {args['prefill']} context ({args['decode_tokens']} greedy steps after the "
              f"prefill, window {args['window']}, median of {args['rounds']} interleaved rounds, {threads} torch "
              "thread(s); CPU-time rates, paired per round with DynamicCache; wall-time ratio beside):", "",
              "| cache | tokens/s (CPU time) | × DynamicCache | wall × DynamicCache |", "|---|---|---|---|"]
    for name, r in sp.items():
        lines.append(f"| {name} | {r.get('cpu_tokens_per_s', r['tokens_per_s']):.1f} | {r['speed_vs_dynamic']:.2f} | "
                     f"{r.get('wall_speed_vs_dynamic', r['speed_vs_dynamic']):.2f} |")
    lines += ["", "| goal | value | met |", "|---|---|---|"]
    for k, v in goals(res).items():
        lines.append(f"| {k} | {v['value']} | {'yes' if v['met'] else 'NO'} |")
    lines += ["", summary(res)]
    env = res["env"]
    lines += ["", f"Machine: {env['cpu']}, {env['cpu_count']} CPUs shared with other jobs (load average "
              f"{env['loadavg_start'][0]:.1f} at start, {env['loadavg_end'][0]:.1f} at end), torch {env['torch']}, "
              f"{env['threads']} threads; total {res['seconds_total'] / 60:.1f} min."]
    return "\n".join(lines)


def _best(rows: dict, method: str, budget: int, bits: int = 16) -> dict | None:
    """The row of ``method`` at ``budget`` with the lowest perplexity over the measured windows."""
    found = [r for r in rows.values() if r["method"] == method and r["budget"] == budget and r["bits"] == bits]
    return min(found, key=lambda r: r["ppl"]) if found else None


def summary(res: dict) -> str:
    """One generated paragraph reading the table (so the README carries no hand-written numbers)."""
    rows = res["quality"]["rows"]
    hs = [r for r in rows.values() if r["method"] == "headscore"]
    wins = [r for r in hs if r["ppl"] < _twin(rows, r)["ppl"]]
    gaps = [100.0 * (_twin(rows, r)["ppl"] - r["ppl"]) / r["ppl"] for r in hs]
    text = (f"Reading it: head-score budgets beat uniform SnapKV in {len(wins)} of {len(hs)} (budget, window, bits) "
            f"cells (SnapKV's perplexity is {min(gaps):+.1f}% to {max(gaps):+.1f}% relative to head-score's).")
    policies = res["args"]["windows"].split(",")
    if len(policies) > 1:
        better = {p: sum(1 for r in hs if r["bits"] == 16 and r["policy"] == p and
                         r["ppl"] <= min(o["ppl"] for o in hs if o["bits"] == 16 and o["budget"] == r["budget"]))
                  for p in policies}
        n_budgets = len({r["budget"] for r in hs})
        text += " Best window per budget (head-score, unquantized): " + ", ".join(
            f"{'half the budget' if p == 'half' else p + ' tokens'} at {n} of {n_budgets} budgets"
            for p, n in better.items()) + "."
    r256 = _best(rows, "headscore", 256)
    if r256 is not None:
        d = r256["ppl_vs_full_pct"]
        text += (f" At 256 tokens per head the best head-score cache (window {r256['window']}) is {d:+.2f}% from the "
                 f"full cache's perplexity: the 5% goal is {'met' if d <= 5 else f'missed by {d - 5:.2f} points'}.")
    within = sorted({r["budget"] for r in hs if r["bits"] == 16 and r["ppl_vs_full_pct"] <= 5.0})
    text += (f" The smallest budget within 5% here is {within[0]}." if within else
             " No budget measured here is within 5% of the full cache.")
    q8 = [r for r in rows.values() if r["bits"] == 8 and r["method"] != "full"]
    if q8:
        worst8 = max(abs(r["ppl"] - rows[_key(r["method"], r["budget"], 16, r["policy"])]["ppl"]) /
                     rows[_key(r["method"], r["budget"], 16, r["policy"])]["ppl"] * 100 for r in q8)
        text += f" 8-bit kept tokens change perplexity by at most {worst8:.2f}% against unquantized eviction."
    return text


def goals(res: dict) -> dict:
    rows = res["quality"]["rows"]
    out = {}
    for method, name in (("headscore", "head-score"), ("snapkv", "SnapKV")):
        r = _best(rows, method, 256)
        if r is not None:
            d = r["ppl_vs_full_pct"]
            out[f"{name} 256 (best window, {r['window']}): ppl within 5% of full"] = {"value": f"{d:+.2f}%",
                                                                                     "met": d <= 5.0}
    hs = [r for r in rows.values() if r["method"] == "headscore"]
    for budget in sorted({r["budget"] for r in hs}):
        cells = [r for r in hs if r["budget"] == budget]
        wins = sum(r["ppl"] < _twin(rows, r)["ppl"] for r in cells)
        worst = min(cells, key=lambda r: _twin(rows, r)["ppl"] - r["ppl"])
        out[f"head-score < SnapKV at {budget} (every window and bit-width)"] = {
            "value": f"{wins} of {len(cells)}; closest {worst['ppl']:.3f} vs {_twin(rows, worst)['ppl']:.3f} "
                     f"(window {worst['window']}, {worst['bits']} bit)", "met": wins == len(cells)}
    return out


def write_readme(path: str, table: str) -> None:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start, end = f"<!-- {MARK}:start -->", f"<!-- {MARK}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} markers")
    new = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: f"{start}\n{table}\n{end}", text, flags=re.S)
    from lib.io import write_text

    write_text(path, new)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.render:
        with open(args.render, encoding="utf-8") as f:
            res = json.load(f)
        table = markdown(res)
        print(table)
        if args.readme:
            write_readme(args.readme, table)
        return
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    tokens = get_eval_tokens("wikitext2", tok, data_dir=args.data_dir)
    num_layers, kv_heads, head_dim = kv_dims(model)
    res_env_load = os.getloadavg()
    res: dict = {
        "env": {"torch": torch.__version__, "transformers": transformers.__version__,
                "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                "cpu": platform.processor() or platform.machine(), "loadavg_start": os.getloadavg(),
                "shared_machine": True},
        "model": args.model, "num_layers": num_layers, "kv_heads": kv_heads, "head_dim": head_dim,
        "heads": model.config.num_attention_heads, "eval_tokens": int(tokens.numel()), "args": vars(args),
    }
    if args.speed_only:
        with open(args.out, encoding="utf-8") as f:
            res = json.load(f)
        from lib.kvbudget import head_scores_from_json

        heads = model.config.num_attention_heads
        scores = head_scores_from_json(res["head_scores"]["sparsemm_json"], num_layers, heads)
        for key in ("prefill", "window", "kernel", "pooling", "floor_ratio", "group_size", "token_group_size"):
            setattr(args, key, res["args"][key])
        t0 = time.perf_counter()
        res["speed"] = speed(model, tokens, scores, args)
        res["args"].update(decode_tokens=args.decode_tokens, rounds=args.rounds, decode_budget=args.decode_budget,
                           speed_threads=args.speed_threads)
        res["speed_rerun"] = {"loadavg_start": res_env_load, "loadavg_end": os.getloadavg(),
                              "seconds": round(time.perf_counter() - t0, 1)}
        from lib.io import write_json

        write_json(args.out, res)
        table = markdown(res)
        print(table)
        if args.readme:
            write_readme(args.readme, table)
        return
    t0 = time.perf_counter()
    per_sample = copy_head_scores(model, n_samples=args.probe_samples, length=args.probe_length)
    scores = head_score_tensor(per_sample, num_layers, model.config.num_attention_heads)
    res["head_scores"] = {"probe": "copy", "samples": args.probe_samples, "length": args.probe_length,
                          "seconds": round(time.perf_counter() - t0, 1), "sparsemm_json": scores_to_json(per_sample)}
    res["quality"] = quality(model, tokens, scores, args)
    res["speed"] = speed(model, tokens, scores, args)
    if args.llava:
        res["llava"] = llava_smoke(args.llava, args)
    res["env"]["loadavg_end"] = os.getloadavg()
    res["seconds_total"] = round(time.perf_counter() - t_start, 1)
    res["goals"] = goals(res)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    from lib.io import write_json

    write_json(args.out, res)
    table = markdown(res)
    print(table)
    if args.readme:
        write_readme(args.readme, table)
    print(f"\nwrote {args.out} ({res['seconds_total']} s)")


if __name__ == "__main__":
    main()
