#!/usr/bin/env python
"""Benchmark every pruning method on one model: WikiText-2 test perplexity, pruning and calibration seconds,
and peak memory, each configuration in its own `main.py` process (so peak RSS is that run's alone).

    python scripts/bench_prune.py --model ../shared/testbed/llama-c4-5m --data_dir ../shared/testbed/data \
        --out scripts/results/prune_cpu.json --readme README.md

Writes the JSON, prints a markdown table, and with --readme replaces the table between the
`<!-- bench_prune:start -->` and `<!-- bench_prune:end -->` markers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

METHODS = ["dense", "magnitude", "wanda", "sparsegpt", "optspa"]
PATTERNS = ["unstructured", "4:8", "2:4"]


def run_one(cmd: list[str], log_path: str) -> tuple[int, float, int]:
    """Run ``cmd``; returns (exit status, wall seconds, peak RSS bytes of that process)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    return code, wall, usage.ru_maxrss * 1024  # Linux reports KiB


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def table(results: list[dict]) -> str:
    dense = next((r for r in results if r["method"] == "dense"), None)
    lines = ["| sparsity | method | WikiText-2 ppl | ppl / dense | actual sparsity | prune s | calib s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = r["ppl"] / dense["ppl"] if dense else float("nan")
        label = "-" if r["method"] == "dense" else ("50% unstructured" if r["pattern"] == "unstructured"
                                                     else r["pattern"])
        lines.append(f"| {label} | {r['method']} | {r['ppl']:.2f} | {ratio:.3f} | {r['actual_sparsity']:.4f} | "
                     f"{r['prune_seconds']:.2f} | {r['calib_seconds']:.2f} | {r['peak_rss'] / 2**20:.0f} |")
    return "\n".join(lines)


def footnote(out: dict) -> str:
    m = out["machine"]
    return (f"Measured on {m['platform']}, {m['cpus']} CPUs, torch {m['torch']}"
            f"{', ' + m['gpu'] if 'gpu' in m else ''}; {out['nsamples']} c4 calibration windows of {out['seqlen']} "
            f"tokens. Model weights {out['model_bytes'] / 2**20:.1f} MiB, one calibration activation buffer "
            f"{out['activation_buffer_bytes'] / 2**20:.1f} MiB.")


def update_readme(path: str, text: str) -> None:
    from lib.io import write_text

    start, end = "<!-- bench_prune:start -->", "<!-- bench_prune:end -->"
    content = open(path, encoding="utf-8").read()
    if start not in content or end not in content:
        raise SystemExit(f"{path} has no {start} ... {end} markers")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    write_text(path, f"{head}{start}\n{text}\n{end}{tail}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory or hub id")
    p.add_argument("--data_dir", default=None, help="local datasets (see main.py --data_dir)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128, as Wanda)")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, help="methods to run")
    p.add_argument("--patterns", nargs="+", default=PATTERNS, help="sparsity types at 50%%")
    p.add_argument("--device", default=None, help="passed to main.py")
    p.add_argument("--dtype", default="auto", help="passed to main.py")
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--readme", default=None, help="README to update between the bench_prune markers")
    p.add_argument("--from_json", action="store_true", help="run nothing: rebuild the table from --out")
    args = p.parse_args()
    if args.from_json:
        out = json.load(open(args.out))
        text = table(out["results"]) + "\n\n" + footnote(out)
        print(text)
        if args.readme:
            update_readme(args.readme, text)
        return 0

    from lib.io import write_json

    runs = [("dense", "unstructured")] if "dense" in args.methods else []
    runs += [(m, pat) for pat in args.patterns for m in args.methods if m != "dense"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for method, pattern in runs:
            save = os.path.join(tmp, f"{method}-{pattern.replace(':', '-')}")
            cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--model", args.model, "--prune_method", method,
                   "--sparsity_type", pattern, "--nsamples", str(args.nsamples), "--dtype", args.dtype,
                   "--save", save]
            if method != "dense" and pattern == "unstructured":
                cmd += ["--sparsity_ratio", "0.5"]
            if method == "dense":
                cmd[cmd.index("--sparsity_type"):cmd.index("--sparsity_type") + 2] = []
            if args.data_dir:
                cmd += ["--data_dir", args.data_dir]
            if args.device:
                cmd += ["--device", args.device]
            code, wall, rss = run_one(cmd, save + ".log")
            if code != 0:
                sys.stderr.write(open(save + ".log").read()[-3000:])
                raise SystemExit(f"{method} {pattern} failed with status {code}")
            res = json.load(open(os.path.join(save, f"results_{method}.json")))
            row = {"method": method, "pattern": pattern, "ppl": res["ppl"]["wikitext2"],
                   "actual_sparsity": res["actual_sparsity"], "prune_seconds": res["prune_seconds"],
                   "calib_seconds": res["calib_seconds"], "wall_seconds": wall, "peak_rss": rss}
            results.append(row)
            print(f"{method:10s} {pattern:12s} ppl {row['ppl']:9.3f}  prune {row['prune_seconds']:6.2f}s  "
                  f"calib {row['calib_seconds']:6.2f}s  wall {wall:6.1f}s  rss {rss / 2**20:.0f} MiB", flush=True)

    from lib.models import load_model, param_bytes

    lm = load_model(args.model, dtype="float32" if args.dtype == "auto" else args.dtype)
    cfg = lm.model.config.get_text_config() if hasattr(lm.model.config, "get_text_config") else lm.model.config
    seqlen = min(int(cfg.max_position_embeddings), 4096)
    act = args.nsamples * seqlen * cfg.hidden_size * next(lm.model.parameters()).element_size()
    out = {"model": args.model, "nsamples": args.nsamples, "seqlen": seqlen, "machine": machine(),
           "model_bytes": param_bytes(lm.model), "activation_buffer_bytes": act, "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json(args.out, out)
    text = table(results) + "\n\n" + footnote(out)
    print(text)
    if args.readme:
        update_readme(args.readme, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
