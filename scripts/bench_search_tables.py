"""The tables of ``scripts/bench_search.py``: its cells read back as README markdown (the search table, the
restarts read off the seed cells, the shipped profiles) and the profiles it ships into ``profiles/``."""
from __future__ import annotations

import glob
import json
import os
import re

LAYER_SPACE_RANGE = 0.2  # the per-layer space of the rank, KV and joint cells, as they were measured


def load_cells(cells_dir: str, tag: str) -> dict[str, dict]:
    out = {}
    for path in sorted(glob.glob(os.path.join(cells_dir, tag, "*.json"))):
        out[os.path.basename(path)[:-5]] = json.load(open(path, encoding="utf-8"))
    return out


def gap_closed(cells: dict, row: dict) -> float | None:
    """Share of the uniform-to-dense WikiText-2 test gap that ``row`` closes against uniform, same method."""
    dense = cells.get("dense")
    uni = cells.get(f"uniform-{row['method']}-s{row['target']:.2f}")
    if dense is None or uni is None or uni["wikitext2_test"] <= dense["wikitext2_test"]:
        return None
    return (uni["wikitext2_test"] - row["wikitext2_test"]) / (uni["wikitext2_test"] - dense["wikitext2_test"])


def searched_before(cell: dict) -> str:
    """The search time of a cell rebuilt from another protocol's profile (its own seconds are the prune)."""
    return f" (+{cell['search']['seconds']:.0f} searched before)" if cell.get("profile_from") else ""


def markdown(cells: dict, tag: str) -> str:
    if not cells:
        return f"No cells measured yet for `{tag}`."
    any_cell = next(iter(cells.values()))
    measured = [c for c in cells.values() if "test_windows" in c]
    tw = sorted({(c["test_windows"], c["test_windows_total"]) for c in measured})
    tw_text = ", ".join("all" if a == b else f"the first {a} of {b}" for a, b in tw)
    c4w = ", ".join(str(w) for w in sorted({c["c4_windows"] for c in measured}))
    lines = [f"Model `{tag}`; c4 calibration, {any_cell['nsamples']} windows of {any_cell['seqlen']}; WikiText-2 test "
             f"perplexity ({tw_text} windows, Wanda's protocol) and C4 validation perplexity ({c4w} windows of "
             f"held-out documents); machine: {'; '.join(sorted({c['machine'] for c in cells.values()}))}.", "",
             "| target | allocation (method) | WikiText-2 test | C4 val | actual sparsity | gap closed vs uniform | "
             "search: full evals (trials done/stopped) | s / full eval | search memory / linears | prune (+search) s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    if "dense" in cells:
        d = cells["dense"]
        lines.append(f"| - | dense | {d['wikitext2_test']:.2f} | {d['c4_val']:.2f} | {d['actual_sparsity']:.4f} "
                     f"|  |  |  |  |  |")
    order = {"uniform": 0, "owl": 1, "search": 2, "kv-uniform": 3, "kv-two-level": 4, "kv-search": 5,
             "kv-after-search": 6, "joint-search": 7}
    rank = [c for c in cells.values() if c.get("allocation") == "rank"]
    rows = [c for k, c in cells.items() if k != "dense" and c.get("allocation") != "rank"]
    rows.sort(key=lambda c: (c["target"], order[c["allocation"]], c["method"], c.get("variant", "")))
    for c in rows:
        name = {"uniform": "uniform", "owl": "OWL"}.get(c["allocation"])
        if c["allocation"].startswith(("kv", "joint")):
            name = {"kv-uniform": f"KV uniform {c['kv_avg_bits']:g} bits",
                    "kv-two-level": f"KV two-level ({c.get('split')}), avg {c['kv_avg_bits']:g}",
                    "kv-search": f"KV search, K and V per layer, avg {c['kv_avg_bits']:g}",
                    "kv-after-search": f"search {c.get('variant')}, then KV uniform {c['kv_avg_bits']:g} bits",
                    "joint-search": f"joint sparsity + KV search, avg {c['kv_avg_bits']:g} bits"}[c["allocation"]]
        s = c.get("search")
        if c["allocation"] == "search":
            unit = c["granularity"] + (" depth only" if c.get("trend_types") is False else "")
            # cells made before the share was recorded ran a quarter, the only share then
            unit += f", trend for {c.get('coarse_fraction') or 0.25:g}" if c["granularity"] == "trend_layer" else ""
            spread = " spread" if c.get("objective_spread") else ""
            spread += " WikiText-2 val" if c["objective"] == "kl" and c.get("objective_text") == "wikitext2" else ""
            unpruned = " unpruned" if c.get("coarse_pruner") == "none" and c.get("pruner") != "none" else ""
            sampler = c["sampler"] + (f" (trend: {c['coarse_sampler']}{unpruned})"
                                      if c.get("coarse_sampler") not in (None, "tpe") else "")
            sampler += f", {c['pruner']} pruner" if c.get("pruner") in ("baseline", "running") else ""
            sampler += ", no pruner" if c.get("pruner") == "none" and c["sampler"] == "tpe" else ""
            coarse_rule = c.get("coarse_pruner")
            sampler += (f" ({coarse_rule} in the trend stage)" if coarse_rule in ("baseline", "running")
                        and coarse_rule != c.get("pruner") else "")
            scale = c.get("startup_scale", 1)
            sampler += f", start-up within {scale:g} of the range" if scale < 1 else ""
            name = (f"search {c['variant']} ({unit}, +-{c['range']:g}, {sampler}, "
                    f"{c['objective']} on {s['objective_windows']}{spread} windows"
                    + (f", best of {c['select_top']} on {s['selection_windows']}" if s.get("selection_windows") else "")
                    + (f", sampler seed {c['sampler_seed']}" if c.get("sampler_seed") else "")
                    + (f", best of {c['restarts']} restarts" if (c.get("restarts") or 1) > 1 else "")
                    + ((" and their mean" + (" (shipped)" if s.get("shipped_trial") is None else " (lost)"))
                       if c.get("restart_mean") else "")
                    + (f", the {c['elite_mean']} best averaged last"
                       + (" (best trial)" if str(s["best_trial"]) in (s.get("elite_values") or {}) else "")
                       if c.get("elite_mean") else "")
                    + (", trials on the uniform pruning's statistics" if c.get("trial_stats") == "uniform" else "")
                    + f", shipped {s['shipped']})")
            if c.get("profile_from"):  # rebuilt from a cell of another protocol, not searched here
                source = os.path.basename(os.path.dirname(os.path.dirname(c["profile_from"])))
                name += f", profile searched in `{source}`"
        gap = gap_closed(cells, c) if c["allocation"] in ("uniform", "owl", "search") else None
        cost = f"{s['cost_evals']:.1f} ({s['complete_trials']}/{s['pruned_trials']})" if s else ""
        if s and s.get("selection_evals"):
            cost += f" + {s['selection_evals']:.0f} selecting"
        if s and s.get("reprune_evals"):  # recorded from 7 December 2026: the re-prunes' time in evaluations
            cost += f" + {s['reprune_evals']:.0f} re-pruning"
        per_eval = f"{s['s_per_eval']:.1f}" if s and s.get("s_per_eval") else ""
        mem = ""
        if s:
            m = s["memory"]
            factors = m.get("oneshot_host_bytes", 0) / m["decoder_linear_bytes"]
            mem = f"{m['band_ratio']:.2f}x band + {m['total_ratio'] - m['band_ratio'] - factors:.2f}x host copy"
            mem += f" + {factors:.2f}x SparseGPT factors" if factors else ""
        lines.append(f"| {c['target']:.2f} | {name} ({c['method']}) | {c['wikitext2_test']:.2f} | {c['c4_val']:.2f} | "
                     f"{c['actual_sparsity']:.4f} | {'' if gap is None else f'{gap:.3f}'} | {cost} | {per_eval} | "
                     f"{mem} | {c['seconds']:.0f}{searched_before(c)} |")
    for c in rank:
        lines.append("")
        lines.append(f"Oneshot vs sequential ranking ({c['method']}, {c['target']:.2f}): Spearman "
                     f"{c['spearman']:.3f} over {c['profiles']} random feasible profiles of the per-layer space "
                     f"(+-{LAYER_SPACE_RANGE:g}), "
                     "each scored on the search objective both ways"
                     + (f" (pruned with {c['calib_windows']} calibration windows)" if c.get("calib_windows") else "")
                     + (f"; {c['spearman_uniform_stats']:.3f} with the trials' statistics from the uniform "
                        "sequential pruning (`--trial_stats uniform`)." if "spearman_uniform_stats" in c else "."))
    return "\n".join(lines + restarts_markdown(cells))


def seed_groups(cells: dict) -> dict[tuple, list[dict]]:
    """Search cells that differ only in the sampler's seed (``X``, ``X+seed1``, ...), at least two per group."""
    groups: dict[tuple, list[dict]] = {}
    for c in cells.values():
        if c.get("allocation") == "search" and "wikitext2_test" in c:
            base = "+".join(p for p in c["variant"].split("+") if not p.startswith("seed"))
            groups.setdefault((c["target"], c["method"], base), []).append(c)
    return {k: sorted(g, key=lambda c: c.get("sampler_seed") or 0) for k, g in sorted(groups.items()) if len(g) > 1}


def restarts_markdown(cells: dict) -> list[str]:
    """Restarts read off the seed cells: the seeds as separate searches, the one with the best value on the search
    objective (validation) ships; its cost is the seeds' evaluations together."""
    groups = seed_groups(cells)
    if not groups:
        return []
    lines = ["", "Restarts, read off the cells that differ only in the sampler's seed: each seed a separate search,",
             "the best on the search objective (validation) ships, at the cost of all of them:", "",
             "| target | search (method) | seeds: validation value | shipped seed | WikiText-2 test | C4 val | "
             "gap closed (seeds' mean) | full evals |", "|---|---|---|---|---|---|---|---|"]
    for (target, method, base), group in groups.items():
        best = min(group, key=lambda c: c["search"]["shipped_value"])
        gaps = [gap_closed(cells, c) for c in group]
        gap = gap_closed(cells, best)
        mean = "" if None in gaps else f" ({sum(gaps) / len(gaps):.3f})"
        values = ", ".join(f"{c.get('sampler_seed') or 0}: {c['search']['shipped_value']:.2f}" for c in group)
        lines.append(f"| {target:.2f} | {base} ({method}) | {values} | {best.get('sampler_seed') or 0} | "
                     f"{best['wikitext2_test']:.2f} | {best['c4_val']:.2f} | {'' if gap is None else f'{gap:.3f}'}"
                     f"{mean} | {sum(c['search']['cost_evals'] for c in group):.1f} |")
    return lines


def write_profiles(cells: dict, tag: str, profiles_dir: str, variants: list[str]) -> list[str]:
    """Ship the profiles of the ``variants``' search cells into ``profiles_dir``, each with the command and the
    cell that measured it; cells without a stored profile are left alone. ``default`` (the settings main.py
    runs by default) gets the plain name; another variant adds its settings to it (``..._s0.70_r0.3.json``),
    unless it shipped the default cell's allocation (``em4`` where the mean lost): no second file for one model."""
    from lib.io import write_json
    from lib.profile import profile_filename

    written = []
    for name, c in sorted(cells.items()):
        if c.get("allocation") != "search" or c.get("variant") not in variants or "profile" not in c:
            continue
        default = cells.get(f"search-{c['method']}-s{c['target']:.2f}-default", {}).get("profile") or {}
        if c["variant"] != "default" and all(default.get(k) == c["profile"].get(k)
                                             for k in ("sparsity", "module_sparsity", "key_bits", "value_bits")):
            continue
        prof = json.loads(json.dumps(c["profile"]))
        prof.setdefault("meta", {}).update({"command": c.get("command"), "storage": None, "bench_cell": name})
        filename = profile_filename(c["method"], "unstructured", c["target"])
        if c["variant"] != "default":
            suffix = "-".join(p for p in c["variant"].split("+") if p != "default")
            filename = filename[: -len(".json")] + f"_{suffix}.json"
        path = os.path.join(profiles_dir, f"{tag}_{filename}")
        write_json(path, prof)
        written.append(path)
    return written


def profiles_markdown(profiles_dir: str, cells_dir: str) -> str:
    """One row per shipped profile, with the measured numbers of the benchmark cell that wrote it."""
    from lib.search_config import default_coarse_fraction

    lines = ["| file | model | method | target | unit, range | shipped | WikiText-2 test | uniform (same method) | "
             "gap closed |", "|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(glob.glob(os.path.join(profiles_dir, "*.json"))):
        prof = json.load(open(path, encoding="utf-8"))
        meta = prof.get("meta") or {}
        tag = os.path.basename(prof.get("model") or "")
        cells = load_cells(cells_dir, tag)
        cell = cells.get(meta.get("bench_cell", ""), {})
        uni = cells.get(f"uniform-{prof.get('method')}-s{prof.get('target_sparsity', 0):.2f}", {})
        gap = gap_closed(cells, cell) if cell else None
        coarse = meta.get("coarse_fraction") or cell.get("coarse_fraction") or 0.25  # unrecorded: a quarter
        shown = meta.get("granularity") == "trend_layer" and coarse != default_coarse_fraction(prof["target_sparsity"])
        unit = meta.get("granularity") + (f" (trend for {coarse:g})" if shown else "")
        lines.append(
            f"| `{os.path.basename(path)}` | {tag} | {prof.get('method')} | {prof.get('target_sparsity'):.2f} | "
            f"{unit}, +-{meta.get('sparsity_range')} | {meta.get('shipped')} | "
            f"{cell.get('wikitext2_test', float('nan')):.2f} | {uni.get('wikitext2_test', float('nan')):.2f} | "
            f"{'' if gap is None else f'{gap:.3f}'} |")
    return "\n".join(lines)


def replace_section(path: str, text: str, name: str) -> None:
    from lib.io import write_text

    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    doc = open(path, encoding="utf-8").read()
    if start in doc:
        doc = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _m: f"{start}\n{text}\n{end}", doc, flags=re.S)
    else:
        doc += f"\n{start}\n{text}\n{end}\n"
    write_text(path, doc)
