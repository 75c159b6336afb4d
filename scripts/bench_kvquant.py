#!/usr/bin/env python
"""Benchmark KV-cache quantization (lib/kvquant.py) on the offline testbed.

Measures, in one run:
  * WikiText-2 test perplexity (Wanda protocol, 512-token windows) with simulated KV quantization at
    16/8/6/4 bits and the half-8/half-6 profile (dense model, and ``--pruned_model``; per_token 4 bits
    on the dense model with ``--with_per_token``);
  * real ``PackedQuantizedCache`` bytes per token after a prefill, from ``nbytes()`` cross-checked against the
    storages of the tensors it holds and against the analytic formula, as a ratio to float16;
  * decode tokens/s of the real cache vs transformers' DynamicCache at 512 and 2048 context, interleaved
    rounds, plus the time spent inside the caches' ``update``;
  * a LLaVA smoke test: generation with an image and the real cache equals generation under the hooks.

Usage:  python scripts/bench_kvquant.py --out scripts/results/kvquant_cpu.json [--pruned_model DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import transformers
from transformers import DynamicCache

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib.data import get_eval_tokens  # noqa: E402
from lib.eval import eval_ppl  # noqa: E402
from lib.kvquant import (  # noqa: E402
    KVQuantConfig,
    PackedQuantizedCache,
    fp16_kv_bytes_per_token,
    kv_bytes_per_token,
    kv_dims,
    simulate_kv_quant,
)
from lib.models import load_model  # noqa: E402

logger = logging.getLogger("bench_kvquant")
TESTBED = "/work/shared/testbed"
TARGETS = {"ratio_8": 0.55, "ratio_6": 0.43, "ratio_half": 0.5, "ppl_inc_8_pct": 0.5, "ppl_inc_6_pct": 2.0,
           "decode_speed_ratio": 0.7}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=f"{TESTBED}/llama-c4-5m")
    p.add_argument("--pruned_model", default=None, help="a model saved by main.py --save_model")
    p.add_argument("--llava", default=f"{TESTBED}/llava-c4-5m", help="'' to skip the LLaVA smoke test")
    p.add_argument("--data_dir", default=f"{TESTBED}/data")
    p.add_argument("--out", default="scripts/results/kvquant_cpu.json")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max_windows", type=int, default=None, help="limit ppl windows (default: full test set)")
    p.add_argument("--group_size", type=int, default=32)
    p.add_argument("--token_group_size", type=int, default=64)
    p.add_argument("--residual", type=int, default=0)
    p.add_argument("--contexts", default="512,2048")
    p.add_argument("--decode_tokens", type=int, default=32, help="timed decode steps per round")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds per method (median reported)")
    p.add_argument("--merge", action="store_true",
                   help="update an existing --out file: replace only the sections measured in this run")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0: torch's default). 1 by default: on a shared 2-core box, 2 OpenMP threads "
                        "competing with other jobs made a 512-token forward 15x slower (2.2 s vs 0.14 s)")
    p.add_argument("--with_per_token", action="store_true", help="also evaluate the per_token scheme at 4 bits")
    p.add_argument("--skip_ppl", action="store_true")
    return p.parse_args()


def kv_configs(num_layers: int, args: argparse.Namespace) -> dict[str, KVQuantConfig]:
    kw = dict(group_size=args.group_size, token_group_size=args.token_group_size, residual=args.residual)
    configs = {
        "16": KVQuantConfig.uniform(16, num_layers, **kw),
        "8": KVQuantConfig.uniform(8, num_layers, **kw),
        "6": KVQuantConfig.uniform(6, num_layers, **kw),
        "4": KVQuantConfig.uniform(4, num_layers, **kw),
        "8/6 half": KVQuantConfig.half_half(8, 6, num_layers, **kw),
    }
    if args.with_per_token:
        configs["4 per_token"] = KVQuantConfig.uniform(4, num_layers, scheme="per_token", **kw)
    return configs


# ------------------------------------------------------------------------------------------------ perplexity
def bench_ppl(model, tokens: torch.Tensor, configs: dict[str, KVQuantConfig], args) -> dict[str, dict]:
    out: dict[str, dict] = {}
    extra = {} if args.max_windows is None else {"max_windows": args.max_windows}
    for name, cfg in configs.items():
        t0 = time.perf_counter()
        with simulate_kv_quant(model, None if cfg.is_off() else cfg):
            ppl = eval_ppl(model, tokens, seqlen=args.seqlen, device="cpu", desc=f"ppl kv={name}", **extra)
        out[name] = {"ppl": ppl, "seconds": round(time.perf_counter() - t0, 1)}
        logger.info("kv=%s ppl=%.3f (%.0fs)", name, ppl, out[name]["seconds"])
    base = out["16"]["ppl"]
    for row in out.values():
        row["increase_pct"] = 100.0 * (row["ppl"] - base) / base
    return out


# ------------------------------------------------------------------------------------------------ memory
def bench_memory(model, tokens: torch.Tensor, configs: dict[str, KVQuantConfig], prefill: int) -> dict[str, dict]:
    num_layers, kv_heads, head_dim = kv_dims(model)
    fp16 = fp16_kv_bytes_per_token(num_layers, kv_heads, head_dim)
    dtype_bytes = next(model.parameters()).element_size()
    out: dict[str, dict] = {}
    for name, cfg in configs.items():
        cache = PackedQuantizedCache.for_model(model, cfg)
        with torch.inference_mode():
            model(tokens[:, :prefill], past_key_values=cache, use_cache=True)
        n = cache.get_seq_length()
        held = sum(t.numel() * t.element_size() for t in cache.stored_tensors())
        bpt = cache.nbytes() / n
        out[name] = {
            "tokens": n,
            "nbytes": cache.nbytes(),
            "sum_of_held_tensors": held,
            "sum_of_held_storages": cache.storage_nbytes(),
            "bytes_per_token": bpt,
            "analytic_bytes_per_token": kv_bytes_per_token(cfg, kv_heads, head_dim, dtype_bytes=dtype_bytes),
            "fp16_bytes_per_token": fp16,
            "ratio_to_fp16": bpt / fp16,
            "workspace_bytes": cache.workspace_nbytes(),
            "consistent": cache.nbytes() == held == cache.storage_nbytes(),
        }
        logger.info("kv=%s %.1f B/token (%.3fx fp16)", name, bpt, bpt / fp16)
    return out


# ------------------------------------------------------------------------------------------------ decode speed
def model_for_context(model, needed: int):
    """The same weights with max_position_embeddings >= needed (default RoPE works for any length)."""
    if model.config.max_position_embeddings >= needed:
        return model, False
    cfg = copy.deepcopy(model.config)
    cfg.max_position_embeddings = needed
    bigger = type(model)(cfg)
    bigger.load_state_dict(model.state_dict())
    return bigger.eval(), True


def _timed_updates(cache) -> list[float]:
    """Wrap every layer's ``update`` to accumulate its wall time (profiling run only)."""
    spent = [0.0]
    for layer in cache.layers:
        orig = layer.update

        def timed(*a, _orig=orig, **kw):
            t = time.perf_counter()
            r = _orig(*a, **kw)
            spent[0] += time.perf_counter() - t
            return r

        layer.update = timed
    return spent


def decode_run(model, prompt: torch.Tensor, make_cache: Callable, steps: int, profile: bool) -> dict:
    cache = make_cache()
    spent = _timed_updates(cache) if profile else None
    with torch.inference_mode():
        logits = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1]
        if spent is not None:
            spent[0] = 0.0  # time decode steps only
        tok = logits.argmax(-1, keepdim=True)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            logits = model(tok, past_key_values=cache, use_cache=True).logits[:, -1]
            tok = logits.argmax(-1, keepdim=True)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
    # CPU time: with one thread it excludes the time other jobs on the box hold the core
    res = {"tokens_per_s": steps / dt, "cpu_tokens_per_s": steps / dc, "ms_per_token": 1e3 * dt / steps}
    if spent is not None:
        res["cache_update_ms_per_token"] = 1e3 * spent[0] / steps
    return res


def bench_decode(model, tokens: torch.Tensor, configs: dict[str, KVQuantConfig], args) -> dict[str, dict]:
    methods: dict[str, Callable] = {
        "DynamicCache": lambda: DynamicCache(config=model.config),
        # Speed mode (dequantized working copy kept) and the default storage-only mode, side by side.
        "packed 8": lambda: PackedQuantizedCache(configs["8"], keep_dequantized=True),
        "packed 6": lambda: PackedQuantizedCache(configs["6"], keep_dequantized=True),
        "packed 8/6 half": lambda: PackedQuantizedCache(configs["8/6 half"], keep_dequantized=True),
        "packed 8 storage-only": lambda: PackedQuantizedCache(configs["8"], keep_dequantized=False),
    }
    out: dict[str, dict] = {}
    for ctx in (int(c) for c in args.contexts.split(",")):
        m, extended = model_for_context(model, ctx + args.decode_tokens + 1)
        prompt = tokens[:, :ctx]
        rows: dict[str, list[dict]] = {name: [] for name in methods}
        for name, make in methods.items():  # warm-up, also checks the method runs
            decode_run(m, prompt, make, 4, profile=False)
        for _ in range(args.rounds):  # interleaved, so load changes hit every method alike
            for name, make in methods.items():
                rows[name].append(decode_run(m, prompt, make, args.decode_tokens, profile=False))
        prof = {name: decode_run(m, prompt, make, args.decode_tokens, profile=True) for name, make in methods.items()}
        ctx_out = {"max_position_embeddings_extended": extended, "methods": {}}
        base = rows["DynamicCache"]
        for name in methods:
            r = rows[name]
            ctx_out["methods"][name] = {
                "tokens_per_s": statistics.median(x["tokens_per_s"] for x in r),
                "cpu_tokens_per_s": statistics.median(x["cpu_tokens_per_s"] for x in r),
                # paired: each round's ratio to the DynamicCache run just before it, median over rounds
                "speed_vs_dynamic": statistics.median(
                    x["cpu_tokens_per_s"] / b["cpu_tokens_per_s"] for x, b in zip(r, base)),
                "wall_speed_vs_dynamic": statistics.median(
                    x["tokens_per_s"] / b["tokens_per_s"] for x, b in zip(r, base)),
                "all_rounds_tokens_per_s": [round(x["tokens_per_s"], 2) for x in r],
                "all_rounds_cpu_tokens_per_s": [round(x["cpu_tokens_per_s"], 2) for x in r],
                "cache_update_ms_per_token": prof[name]["cache_update_ms_per_token"],
                "profiled_ms_per_token": prof[name]["ms_per_token"],
            }
        out[str(ctx)] = ctx_out
        logger.info("ctx=%d %s", ctx, {k: round(v["speed_vs_dynamic"], 3) for k, v in ctx_out["methods"].items()})
    return out


# ------------------------------------------------------------------------------------------------ llava smoke
def bench_llava(path: str, cfg_bits: int, args) -> dict:
    from PIL import Image
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    proc = LlavaProcessor.from_pretrained(path)
    image = Image.open(f"{TESTBED}/images/coco_000000039769.png").convert("RGB")
    inputs = proc(text="USER: <image>\nHow many cats are there? ASSISTANT:", images=image, return_tensors="pt")
    num_layers, _, _ = kv_dims(model)
    # short prompt (38 tokens): key groups of 16 so that keys get quantized too
    cfg = KVQuantConfig.uniform(cfg_bits, num_layers, group_size=args.group_size, token_group_size=16,
                                residual=args.residual)
    cache = PackedQuantizedCache.for_model(model, cfg)
    real = model.generate(**inputs, past_key_values=cache, max_new_tokens=12, do_sample=False)
    with simulate_kv_quant(model, cfg):
        sim = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    return {
        "bits": cfg_bits,
        "token_group_size": cfg.token_group_size,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "real_equals_sim": bool(torch.equal(real, sim)),
        "cache_tokens": cache.get_seq_length(),
        "cache_bytes_per_token": cache.bytes_per_token(),
    }


# ------------------------------------------------------------------------------------------------ report
def markdown(res: dict) -> str:
    lines = []
    mem = res["memory"]
    ppl_cols = [k for k in ("dense", "pruned") if k in res.get("ppl", {})]
    head = "| KV | " + " | ".join(f"ppl {c} | Δ {c}" for c in ppl_cols) + " | B/token | ×fp16 |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for name in mem:
        cells = []
        for c in ppl_cols:
            r = res["ppl"][c].get(name)
            cells += [f"{r['ppl']:.3f}", f"{r['increase_pct']:+.2f}%"] if r else ["–", "–"]
        m = mem[name]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['bytes_per_token']:.0f} | {m['ratio_to_fp16']:.3f} |")
    lines += ["", "| decode (CPU-time tok/s, paired ratio; wall ratio) | "
              + " | ".join(f"ctx {c}" for c in res["decode"]) + " |",
              "|---|" + "---|" * len(res["decode"])]
    for name in next(iter(res["decode"].values()))["methods"]:
        cells = []
        for ctx in res["decode"].values():
            r = ctx["methods"][name]
            cells.append(f"{r['cpu_tokens_per_s']:.1f} ({r['speed_vs_dynamic']:.2f}×; wall "
                         f"{r['wall_speed_vs_dynamic']:.2f}×; update {r['cache_update_ms_per_token']:.2f} ms/tok)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| target | value | met |", "|---|---|---|"]
    for k, v in res["targets"].items():
        lines.append(f"| {k} | {v['value']:.3f} (limit {v['limit']}) | {'yes' if v['met'] else 'NO'} |")
    return "\n".join(lines)


def check_targets(res: dict) -> dict:
    mem, t = res["memory"], {}

    def add(key, value, limit, higher_is_better=False):
        t[key] = {"value": value, "limit": limit, "met": value >= limit if higher_is_better else value <= limit}

    add("ratio_8", mem["8"]["ratio_to_fp16"], TARGETS["ratio_8"])
    add("ratio_6", mem["6"]["ratio_to_fp16"], TARGETS["ratio_6"])
    add("ratio_half", mem["8/6 half"]["ratio_to_fp16"], TARGETS["ratio_half"])
    if "dense" in res.get("ppl", {}):
        add("ppl_inc_8_pct", res["ppl"]["dense"]["8"]["increase_pct"], TARGETS["ppl_inc_8_pct"])
        add("ppl_inc_6_pct", res["ppl"]["dense"]["6"]["increase_pct"], TARGETS["ppl_inc_6_pct"])
    for ctx, row in res["decode"].items():
        for name in ("packed 8", "packed 6", "packed 8/6 half"):
            add(f"decode_{name.replace(' ', '_')}_ctx{ctx}", row["methods"][name]["speed_vs_dynamic"],
                TARGETS["decode_speed_ratio"], higher_is_better=True)
    return t


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    loaded = load_model(args.model, dtype="float32", device="cpu")
    model = loaded.model
    tokens = get_eval_tokens("wikitext2", loaded.tokenizer, data_dir=args.data_dir)
    num_layers, kv_heads, head_dim = kv_dims(model)
    configs = kv_configs(num_layers, args)
    res: dict = {
        "env": {"torch": torch.__version__, "transformers": transformers.__version__,
                "threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(),
                "cpu": platform.processor() or platform.machine(), "loadavg_start": os.getloadavg()},
        "model": args.model, "kv_heads": kv_heads, "head_dim": head_dim, "num_layers": num_layers,
        "eval_tokens": int(tokens.numel()), "seqlen": args.seqlen, "max_windows": args.max_windows,
        "configs": {k: v.to_dict() for k, v in configs.items()},
        "notes": [
            "ppl: simulated KV quantization (hooks), one forward per 512-token window, rule applied at T=512",
            "bytes: real PackedQuantizedCache after a 512-token prefill; float16 reference = 2 bytes/element;"
            " the model is float32, so unquantized (16-bit) layers are stored in float32 (ratio 2.0)",
            "decode: greedy steps after the prompt, one torch thread; speed_vs_dynamic = median over interleaved"
            " rounds of (CPU-time tok/s) / (DynamicCache's, same round), wall_speed_vs_dynamic the same on wall"
            " time (noisy on a shared box); contexts above max_position_embeddings (512) use a copy of the config"
            " with a larger max_position_embeddings (default RoPE), output quality is irrelevant there",
            "'storage-only' holds only packed codes and re-dequantizes the whole cache each step; the default"
            " keeps a dequantized workspace (workspace_bytes, not counted in nbytes)",
        ],
    }
    res["memory"] = bench_memory(model, tokens, configs, prefill=args.seqlen)
    res["decode"] = bench_decode(model, tokens, configs, args)
    if not args.skip_ppl:
        res["ppl"] = {"dense": bench_ppl(model, tokens, configs, args)}
        if args.pruned_model:
            pruned = load_model(args.pruned_model, dtype="float32", device="cpu").model
            main_configs = {k: v for k, v in configs.items() if k != "4 per_token"}
            res["ppl"]["pruned"] = bench_ppl(pruned, tokens, main_configs, args)
            res["pruned_model"] = args.pruned_model
    if args.llava:
        res["llava"] = bench_llava(args.llava, 4, args)
    res["env"]["loadavg_end"] = os.getloadavg()
    res["seconds_total"] = round(time.perf_counter() - t_start, 1)
    if args.merge and os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
        measured = {k: v for k, v in res.items() if k in ("memory", "decode", "ppl", "llava")}
        old.setdefault("merged_runs", []).append({"sections": sorted(measured), "env": res["env"],
                                                  "seconds_total": res["seconds_total"]})
        old.update(measured)
        res = old
    res["targets"] = check_targets(res)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(markdown(res))
    print(f"\nwrote {args.out} ({res['seconds_total']} s)")


if __name__ == "__main__":
    main()
