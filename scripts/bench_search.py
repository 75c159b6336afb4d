"""Benchmark the layer-wise allocations on a real model: uniform Wanda, uniform Optspa metric, OWL, TPE search
(block, layer and module granularity) and a joint sparsity + KV-bits search; WikiText-2 *test* perplexity of each,
search objective on WikiText-2 *validation*. Also: oneshot vs sequential trial cost and rank agreement.

    python scripts/bench_search.py --model ../shared/testbed/llama-c4-5m --data_dir ../shared/testbed/data \\
        --out scripts/results/search_cpu.json --readme README.md --profiles_dir profiles

Results are written after every measurement (atomically), so an interrupted run keeps what it finished.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from lib import data  # noqa: E402
from lib.eval import eval_ppl  # noqa: E402
from lib.io import write_json, write_text  # noqa: E402
from lib.kvquant import KVQuantConfig, kv_dims, simulate_kv_quant  # noqa: E402
from lib.models import decoder_layers, load_model  # noqa: E402
from lib.owl import DEFAULT_LAMBDA, DEFAULT_M, owl_profile  # noqa: E402
from lib.profile import Profile  # noqa: E402
from lib.prune import check_sparsity, prune_optspa, prune_wanda  # noqa: E402
from lib.search import (DenseSnapshot, SearchConfig, SearchSpace, TrialRunner, dense_input_stats,  # noqa: E402
                        module_shapes, run_search)
from lib.profile import profile_filename  # noqa: E402
from lib.sparsity import SparsityType  # noqa: E402

logger = logging.getLogger("bench_search")
MARK_START, MARK_END = "<!-- bench_search:start -->", "<!-- bench_search:end -->"
PROFILES_START, PROFILES_END = "<!-- profiles:start -->", "<!-- profiles:end -->"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.join(ROOT, "..", "shared", "testbed", "llama-c4-5m"))
    p.add_argument("--data_dir", default=os.path.join(ROOT, "..", "shared", "testbed", "data"))
    p.add_argument("--out", default=os.path.join(ROOT, "scripts", "results", "search_cpu.json"))
    p.add_argument("--readme", default=None, help="replace the bench_search section of this markdown file")
    p.add_argument("--profiles_dir", default=None,
                   help="also write the searched profiles here, and their table into its README.md")
    p.add_argument("--work_dir", default=None, help="study databases (default: a temporary folder)")
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.6])
    p.add_argument("--n_trials", type=int, default=50)
    p.add_argument("--granularities", nargs="+", default=["block", "layer", "module"],
                   choices=["block", "layer", "module"], help="sparsity searches to run per target")
    p.add_argument("--num_blocks", type=int, default=None,
                   help="blocks of the block searches (default min(8, layers // 2): the original's 8 on 32-layer "
                        "models, 4 blocks of 2 layers on the 8-layer testbed, so block and layer differ)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (c4)")
    p.add_argument("--objective_nsamples", type=int, default=64, help="WikiText-2 validation windows per trial")
    p.add_argument("--kv_avg_bits", type=float, default=7.0)
    p.add_argument("--joint_target", type=float, default=0.5)
    p.add_argument("--seq_compare", type=int, default=8, help="trials re-scored in sequential mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max_test_windows", type=int, default=None, help="evaluate only the first N test windows (CPU time); default all")
    p.add_argument("--table_only", action="store_true", help="print (and --readme) the table of an existing --out")
    args = p.parse_args()
    if args.table_only:
        import json

        publish(json.load(open(args.out, encoding="utf-8")), args)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    for noisy in ("transformers", "lib.eval", "lib.kvquant"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_search_")
    os.makedirs(work, exist_ok=True)

    t_start = time.perf_counter()
    lm = load_model(args.model, dtype="float32")
    model, tok = lm.model, lm.tokenizer
    seqlen = int(model.config.max_position_embeddings)
    calib = data.get_calibration("c4", tok, args.nsamples, args.seed, seqlen, args.data_dir)
    val_ids = data.get_eval_tokens("wikitext2", tok, args.data_dir, "validation", seqlen)
    test_ids = data.get_eval_tokens("wikitext2", tok, args.data_dir, "test", seqlen)
    num_layers = len(decoder_layers(model))
    num_blocks = args.num_blocks or max(1, min(8, num_layers // 2))
    snapshot = DenseSnapshot(model)
    dense_stats = dense_input_stats(model, calib, "cpu")
    group = KVQuantConfig.uniform(8, num_layers).group_size
    kv_group = group if kv_dims(model)[2] % group == 0 else kv_dims(model)[2]
    res: dict = {"model": os.path.basename(os.path.normpath(args.model)), "seqlen": seqlen,
                 "calibration": f"c4, {args.nsamples} windows, seed {args.seed}",
                 "objective": f"WikiText-2 validation perplexity, {args.objective_nsamples} windows of {seqlen}",
                 "report": "WikiText-2 test perplexity, Wanda's protocol, " + (
                     "all windows" if args.max_test_windows is None else f"first {args.max_test_windows} windows"),
                 "n_trials": args.n_trials, "machine": f"{platform.processor() or platform.machine()}, "
                 f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads",
                 "rows": [], "search": [], "modes": None}

    def save() -> None:
        res["total_seconds"] = time.perf_counter() - t_start
        write_json(args.out, res)

    def test_ppl(kv_bits: list[int] | None = None) -> float:
        cfg = None if kv_bits is None else KVQuantConfig(kv_bits, kv_bits, group_size=kv_group)
        with simulate_kv_quant(model, cfg):
            return eval_ppl(model, test_ids, seqlen, "cpu", desc="wikitext2 test", max_windows=args.max_test_windows)

    def row(target: float, name: str, prof: Profile | None, ppl: float, kv: list[int] | None = None, **extra):
        actual = check_sparsity(model)[0]
        r = {"target": target, "allocation": name, "actual_sparsity": round(actual, 5), "ppl_test": round(ppl, 3),
             "layer_sparsity": prof.sparsity if prof else None, "kv_bits": kv, **extra}
        res["rows"].append(r)
        logger.info("RESULT %.2f %-28s sparsity %.4f test ppl %.3f", target, name, actual, ppl)
        save()

    def search(target: float, kind: str, gran: str) -> tuple[Profile, dict]:
        cfg = SearchConfig(target=target, kind=kind, granularity=gran, num_blocks=num_blocks,
                           n_trials=args.n_trials, seed=args.seed, kv_avg_bits=args.kv_avg_bits,
                           save_dir=os.path.join(work, f"{kind}_{gran}_{target:.2f}"))
        snapshot.restore()  # every search starts from the dense weights, as in a fresh main.py run
        r = run_search(model, cfg, calib=calib, objective_ids=val_ids, seqlen=seqlen,
                       objective_nsamples=args.objective_nsamples, model_name=res["model"], progress=False,
                       kv_kwargs={"group_size": kv_group})
        done = [t for t in r.trials if t["state"] == "COMPLETE"]
        per_trial = sum(t["trial_seconds"] for t in done) / len(done)
        per_eval = sum(t["eval_seconds"] for t in done) / len(done)
        info = {"target": target, "search": kind, "granularity": gran, "num_blocks": num_blocks, "trials": len(done),
                "wall_seconds": round(r.seconds, 1), "trial_seconds": round(per_trial, 3),
                "eval_seconds": round(per_eval, 3), "trial_over_eval": round(per_trial / per_eval, 3),
                "wasted_fraction": r.wasted_fraction, "best_val_ppl": round(r.best_value, 3),
                "uniform_val_ppl": round(done[0]["value"], 3),
                "max_sparsity_error": max(abs(t["realized_sparsity"] - target) for t in done)
                if kind != "kv" else None,
                "max_kv_avg": max(t["kv_avg_bits"] for t in done) if kind != "sparsity" else None,
                "study": r.study_name, "storage": r.storage, "dir": cfg.save_dir, "trials_values": [t["value"] for t in done]}
        res["search"].append(info)
        r.profile.model = "llama-c4-5m (testbed)"
        if args.profiles_dir:
            os.makedirs(args.profiles_dir, exist_ok=True)
            fname = profile_filename("optspa", "unstructured", target,
                                     args.kv_avg_bits if kind == "joint" else None)
            fname = fname.replace(".json", f"_{gran}{num_blocks if gran == 'block' else ''}.json")
            write_json(os.path.join(args.profiles_dir, f"testbed_{fname}"), r.profile.to_dict())
        return r.profile, info

    pattern = SparsityType()
    for target in args.targets:
        uniform = Profile.uniform(num_layers, target)
        snapshot.restore()
        prune_wanda(model, calib, uniform, pattern)
        row(target, "uniform (wanda)", uniform, test_ppl())
        snapshot.restore()
        prune_optspa(model, calib, uniform, pattern)
        uniform_ppl = test_ppl()
        row(target, "uniform (optspa)", uniform, uniform_ppl)
        snapshot.restore()
        owl_prof = owl_profile(model, dense_stats, target, DEFAULT_LAMBDA, DEFAULT_M)
        prune_optspa(model, calib, owl_prof, pattern)
        row(target, f"OWL (optspa, lambda {DEFAULT_LAMBDA}, M {DEFAULT_M:g})", owl_prof, test_ppl())
        for gran in args.granularities:
            prof, info = search(target, "sparsity", gran)
            snapshot.restore()
            prune_optspa(model, calib, prof, pattern)
            ppl = test_ppl()
            info["ppl_test"] = round(ppl, 3)
            info["gain_vs_uniform_pct"] = round(100 * (uniform_ppl - ppl) / uniform_ppl, 2)
            row(target, f"TPE {grain(gran, num_blocks)} (optspa)", prof, ppl, search_seconds=info["wall_seconds"])
            if target == args.targets[0] and gran == args.granularities[0] and args.seq_compare:
                snapshot.restore()
                res["modes"] = compare_modes(model, calib, val_ids, seqlen, args, target, info, num_layers)
                res["modes"]["study"] = f"{target:.0%} {grain(gran, num_blocks)}"
                save()

    # Joint sparsity + KV at an average bit budget, against uniform sparsity with the budget split in halves.
    target = args.joint_target
    snapshot.restore()
    prune_optspa(model, calib, Profile.uniform(num_layers, target), pattern)
    half = [8] * (num_layers // 2) + [6] * (num_layers - num_layers // 2)
    row(target, f"uniform (optspa) + KV 8/6 halves (avg {sum(half) / num_layers:g})", None, test_ppl(half), half)
    prof, info = search(target, "joint", "block")  # sparsity per block, KV bits per layer
    snapshot.restore()
    prune_optspa(model, calib, prof, pattern)
    ppl = test_ppl(prof.key_bits)
    info["ppl_test"] = round(ppl, 3)
    row(target, f"TPE joint {grain('block', num_blocks)} + KV per layer (avg {args.kv_avg_bits:g})", prof, ppl,
        prof.key_bits,
        search_seconds=info["wall_seconds"])
    snapshot.restore()
    save()
    publish(res, args)
    return 0


def publish(res: dict, args) -> None:
    """Print the tables; write them into --readme and --profiles_dir/README.md when given."""
    table = markdown(res)
    print(table)
    if args.readme:
        replace_section(args.readme, table)
    if args.profiles_dir:
        write_profiles_table(args.profiles_dir, res)


def grain(gran: str, num_blocks: int | None) -> str:
    return f"block x{num_blocks}" if gran == "block" and num_blocks else gran


def compare_modes(model, calib, val_ids, seqlen, args, target, info, num_layers) -> dict:
    """Re-score the first trials of a oneshot study with sequential (Wanda-style) pruning."""
    import optuna
    from scipy.stats import spearmanr

    cfg = SearchConfig(target=target, kind="sparsity", granularity=info["granularity"], num_blocks=info["num_blocks"],
                       trial_mode="sequential", save_dir=None)
    runner = TrialRunner(model, cfg, calib, val_ids, seqlen, args.objective_nsamples, "cpu", False)
    space = SearchSpace(cfg, module_shapes(model), num_layers)
    study = optuna.load_study(study_name=info["study"], storage=info["storage"])
    pairs = []
    for t in [t for t in study.trials if t.state.name == "COMPLETE"][: args.seq_compare]:
        value, _, times = runner.evaluate(space.allocation(t.user_attrs["offsets"]))
        pairs.append({"trial": t.number, "oneshot": t.value, "sequential": value,
                      "oneshot_seconds": t.user_attrs["trial_seconds"], "sequential_seconds": times["trial_seconds"],
                      "sequential_eval_seconds": times["eval_seconds"]})
        logger.info("trial %d: oneshot %.3f sequential %.3f (%.1f s)", t.number, t.value, value,
                    times["trial_seconds"])
    runner.restore()
    rho = spearmanr([p["oneshot"] for p in pairs], [p["sequential"] for p in pairs]).statistic if len(pairs) > 2 else None
    return {"target": target, "pairs": pairs, "spearman": None if rho is None else round(float(rho), 3),
            "oneshot_trial_seconds": round(sum(p["oneshot_seconds"] for p in pairs) / max(len(pairs), 1), 3),
            "sequential_trial_seconds": round(sum(p["sequential_seconds"] for p in pairs) / max(len(pairs), 1), 3),
            "eval_seconds": round(sum(p["sequential_eval_seconds"] for p in pairs) / max(len(pairs), 1), 3)}


def markdown(res: dict) -> str:
    lines = [f"Model `{res['model']}`; calibration {res['calibration']}; search objective: {res['objective']}; "
             f"reported: {res['report']}. {res['n_trials']} TPE trials per search (trial 0 is the uniform "
             f"allocation). Machine: {res['machine']}.", "",
             "| target | allocation | actual sparsity | WikiText-2 test ppl | vs uniform optspa | search wall s |",
             "|---|---|---|---|---|---|"]
    base = {r["target"]: r["ppl_test"] for r in res["rows"] if r["allocation"] == "uniform (optspa)"}
    for r in res["rows"]:
        b = base.get(r["target"])
        rel = f"{100 * (r['ppl_test'] - b) / b:+.1f}%" if b and "KV" not in r["allocation"] else ""
        lines.append(f"| {r['target']:.2f} | {r['allocation']} | {r['actual_sparsity']:.4f} | {r['ppl_test']:.2f} | "
                     f"{rel} | {r.get('search_seconds', '')} |")
    lines += ["", "| search | target | trials | wasted | max \\|sparsity - target\\| | max KV avg | s/trial | "
              "s/objective eval | trial / eval | best val ppl (uniform val ppl) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in res["search"]:
        err = "" if s["max_sparsity_error"] is None else f"{s['max_sparsity_error']:.5f}"
        kv = "" if s["max_kv_avg"] is None else f"{s['max_kv_avg']:g}"
        lines.append(f"| {s['search']} {grain(s['granularity'], s.get('num_blocks'))} | {s['target']:.2f} | {s['trials']} | "
                     f"{s['wasted_fraction']:.0%} | {err} | {kv} | {s['trial_seconds']:.2f} | {s['eval_seconds']:.2f} | "
                     f"{s['trial_over_eval']:.2f}x | {s['best_val_ppl']:.2f} ({s['uniform_val_ppl']:.2f}) |")
    m = res.get("modes")
    if m:
        study = m.get("study", f"{res['search'][0]['target']:.0%} block")  # older result files lack the key
        lines += ["", f"Trial modes on the first {len(m['pairs'])} trials of the {study} study: oneshot "
                  f"{m['oneshot_trial_seconds']:.2f} s/trial, sequential (Wanda-style recalibration per trial) "
                  f"{m['sequential_trial_seconds']:.2f} s/trial; Spearman rank correlation of their objective "
                  f"values {m['spearman']}."]
    lines.append(f"\nTotal benchmark wall time {res.get('total_seconds', 0) / 60:.1f} min.")
    return "\n".join(lines)


def profiles_markdown(profiles_dir: str, res: dict) -> str:
    """Table of the profiles in profiles_dir that this result file measured (matched by target, search kind and
    granularity), with the test perplexity of each and of its uniform baseline."""
    import glob
    import json

    lines = ["| file | search | target | granularity | test ppl | uniform baseline test ppl |", "|---|---|---|---|---|---|"]
    rows = res["rows"]
    for path in sorted(glob.glob(os.path.join(profiles_dir, "*.json"))):
        prof = json.load(open(path, encoding="utf-8"))
        meta = prof.get("meta", {})
        kind, gran, target = meta.get("search"), meta.get("granularity"), prof.get("target_sparsity")
        match = [s for s in res["search"] if s["search"] == kind and s["granularity"] == gran
                 and s.get("num_blocks", meta.get("num_blocks")) == meta.get("num_blocks")
                 and abs(s["target"] - target) < 1e-9 and "ppl_test" in s]
        if not match:
            continue
        if kind == "joint":
            base = [r for r in rows if r["target"] == target and r["allocation"].startswith("uniform (optspa) + KV")]
            what = f"sparsity + KV bits {{{', '.join(map(str, sorted(set(prof['kv_bits']['key']))))}}}, " \
                   f"{meta.get('kv_avg_bits'):g}-bit average"
            base_name = "uniform optspa, KV 8/6 halves"
        else:
            base = [r for r in rows if r["target"] == target and r["allocation"] == "uniform (optspa)"]
            what, base_name = kind, "uniform optspa"
        grouping = f"{meta.get('num_blocks')} blocks" if gran == "block" else f"per {gran}"
        b = f"{base[0]['ppl_test']:.2f} ({base_name})" if base else ""
        lines.append(f"| `{os.path.basename(path)}` | {what} | {target:.0%} | {grouping} | {match[0]['ppl_test']:.2f} | {b} |")
    return "\n".join(lines)


def write_profiles_table(profiles_dir: str, res: dict) -> None:
    readme = os.path.join(profiles_dir, "README.md")
    if os.path.exists(readme):
        replace_section(readme, profiles_markdown(profiles_dir, res), PROFILES_START, PROFILES_END)


def replace_section(path: str, table: str, start: str = MARK_START, end: str = MARK_END) -> None:
    text = open(path, encoding="utf-8").read()
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} section")
    new = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _m: f"{start}\n{table}\n{end}", text, flags=re.S)
    write_text(path, new)


if __name__ == "__main__":
    sys.exit(main())
