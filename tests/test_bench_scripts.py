"""The benchmark scripts' own machinery (what makes a long benchmark resumable)."""
import argparse
import json
import os
import platform
import subprocess
import sys

import pytest

from conftest import load_script


def test_cell_lock_is_taken_over_only_from_a_dead_runner_of_this_host(tmp_path):
    take_lock = load_script("bench_search").take_lock
    lock = str(tmp_path / "cell.json.lock")
    assert take_lock(lock) and not take_lock(lock)  # held by a live runner (this process)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with open(lock, "w", encoding="utf-8") as f:  # a killed runner's lock
        f.write(f"{platform.node()} {gone.pid}")
    assert take_lock(lock) and open(lock, encoding="utf-8").read().split() == [platform.node(), str(os.getpid())]
    with open(lock, "w", encoding="utf-8") as f:  # another machine's runner: never taken over
        f.write(f"not-{platform.node()} {gone.pid}")
    assert not take_lock(lock)


def test_search_variants_combine_and_unknown_names_are_refused():
    bench = load_script("bench_search")
    v = bench.variant_settings("evolution+b200")
    assert v["sampler"] == "evolution" and v["budget"] == 200 and v["range"] == bench.DEFAULT_VARIANT["range"]
    # "default" is the tool's own range for the target (None: resolved per target), a variant's range wins
    assert bench.variant_settings("default") == {**bench.DEFAULT_VARIANT, "range": None}
    assert bench.variant_settings("default+r0.2")["range"] == bench.variant_settings("r0.2+default")["range"] == 0.2
    # the trend's share is the tool's (it follows the target) unless a variant names it
    assert "coarse_fraction" not in bench.variant_settings("default")
    assert bench.variant_settings("default+c0.25+seed1")["coarse_fraction"] == 0.25
    with pytest.raises(argparse.ArgumentTypeError, match="unknown variant 'fast'"):
        bench.variant_settings("r0.1+fast")


def test_publish_ships_the_profiles_of_the_default_settings_only(tmp_path):
    """--publish --profiles_dir writes the default-settings search cells' profiles (loadable, with the command
    and the cell that measured them) and nothing for other variants or cells without a stored profile."""
    from lib.profile import Profile, load_profile

    bench = load_script("bench_search")
    prof = Profile(num_layers=2, sparsity=[0.4, 0.6], target_sparsity=0.5).to_dict()
    cell = {"allocation": "search", "method": "optspa", "target": 0.5, "profile": prof, "command": "python x"}
    cells = {"search-optspa-s0.50-default": {**cell, "variant": "default"},
             "search-wanda-s0.50-r0.1": {**cell, "method": "wanda", "variant": "r0.1"},
             "search-optspa-s0.60-default": {**cell, "target": 0.6, "variant": "default", "profile": None}}
    del cells["search-optspa-s0.60-default"]["profile"]
    written = bench.write_profiles(cells, "m", str(tmp_path), ["default"])
    assert [os.path.basename(p) for p in written] == ["m_profile_optspa_unstructured_s0.50.json"]
    assert sorted(os.listdir(tmp_path)) == ["m_profile_optspa_unstructured_s0.50.json"]
    # another variant, asked for, ships beside the default under a name that says its settings
    more = bench.write_profiles(cells, "m", str(tmp_path), ["default", "r0.1"])
    assert sorted(os.path.basename(p) for p in more) == ["m_profile_optspa_unstructured_s0.50.json",
                                                        "m_profile_wanda_unstructured_s0.50_r0.1.json"]
    # a variant that shipped the default cell's allocation adds no second file for the same model
    cells["search-optspa-s0.50-em4"] = {**cell, "variant": "em4"}
    cells["search-optspa-s0.50-em8"] = {**cell, "variant": "em8",
                                        "profile": {**prof, "sparsity": [0.45, 0.55]}}
    (tmp_path / "em").mkdir()
    shipped = bench.write_profiles(cells, "m", str(tmp_path / "em"), ["default", "em4", "em8"])
    assert sorted(os.path.basename(p) for p in shipped) == ["m_profile_optspa_unstructured_s0.50.json",
                                                           "m_profile_optspa_unstructured_s0.50_em8.json"]
    loaded = load_profile(written[0], 2)
    assert loaded.sparsity == [0.4, 0.6]
    assert loaded.meta["command"] == "python x" and loaded.meta["bench_cell"] == "search-optspa-s0.50-default"


def test_restarts_ship_the_seed_with_the_best_validation_value_not_the_best_test():
    """The restarts table reads the seed cells as separate searches: the one with the lowest search-objective value
    ships (here seed 1, although seed 2 scores better on the test set), at the cost of all of them."""
    tables = load_script("bench_search_tables")

    def search(variant, seed, val, test):
        return {"allocation": "search", "method": "optspa", "target": 0.7, "variant": variant, "sampler_seed": seed,
                "wikitext2_test": test, "c4_val": test + 1, "search": {"shipped_value": val, "cost_evals": 50.0}}

    cells = {"dense": {"wikitext2_test": 10.0}, "uniform-optspa-s0.70": {"wikitext2_test": 110.0},
             "a": search("default", None, 30.0, 60.0), "b": search("default+seed1", 1, 20.0, 50.0),
             "c": search("default+seed2", 2, 25.0, 30.0), "alone": search("default+r0.2", None, 1.0, 11.0)}
    rows = [r for r in tables.restarts_markdown(cells) if r.startswith("| 0.70")]
    assert rows == ["| 0.70 | default (optspa) | 0: 30.00, 1: 20.00, 2: 25.00 | 1 | 50.00 | 51.00 | 0.600 (0.633) | "
                    "150.0 |"]
    assert tables.restarts_markdown({"a": cells["a"], "alone": cells["alone"]}) == []  # one seed: no restarts


def test_profiles_from_rebuilds_the_shipped_model_of_another_cells_dir(tiny_llama, data_dir, tmp_path):
    """A search cell measured once can be scored on another protocol without searching again: the rebuilt model
    is the shipped one (same search-objective value, same test perplexity, bit for bit)."""
    import csv
    import json

    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_search.py")
    common = [sys.executable, script, "--model", tiny_llama, "--data_dir", data_dir, "--seqlen", "32",
              "--nsamples", "4", "--objective_nsamples", "2", "--n_trials", "6", "--budget", "3", "--threads", "1",
              "--c4_windows", "2", "--test_windows", "3", "--targets", "0.5", "--methods", "wanda", "--cells", "search",
              "--variants", "default", "default+spread", "default+klw"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    run = subprocess.run([*common, "--cells_dir", first], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    bad = subprocess.run([*common, "--cells_dir", second, "--profiles_from", first, "--seed", "1"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "seed 0 here 1" in bad.stderr and not os.path.exists(second)
    name = "search-wanda-s0.50-default.json"
    tag = os.path.basename(tiny_llama)
    src_path = os.path.join(first, tag, name)
    src = json.load(open(src_path, encoding="utf-8"))
    assert src["calibration"] == {"nsamples": 4, "seqlen": 32, "seed": 0, "split_c4": False, "c4_val_docs": None}
    with open(os.path.join(first, tag, src["trials_csv"]), encoding="utf-8") as f:  # the search's history
        rows = list(csv.DictReader(f))
    assert len(rows) == src["search"]["trials"]
    assert min(float(r["value"]) for r in rows if r["state"] == "COMPLETE") == src["search"]["best_value"]
    # a cell written before calibration was stored: its count and command still say how it was calibrated
    old = {k: v for k, v in src.items() if k != "calibration"}
    json.dump(old, open(src_path, "w", encoding="utf-8"))
    bad = subprocess.run([*common, "--cells_dir", second, "--profiles_from", first, "--split_c4"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "split_c4 False here True" in bad.stderr and not os.path.exists(second)
    run = subprocess.run([*common, "--cells_dir", second, "--profiles_from", first], capture_output=True, text=True,
                         env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.load(open(os.path.join(second, tag, name), encoding="utf-8"))
    assert out["rebuilt_value"] == src["search"]["shipped_value"]
    assert out["wikitext2_test"] == src["wikitext2_test"] and out["profile"] == src["profile"]
    assert out["profile_from"].endswith(name) and out["search"] == src["search"]
    # every setting the source cell records is carried (the same protocol here, so the measurements match too)
    carried = set(src) - {"trials_csv", "seconds"}
    assert {k: out.get(k) for k in carried} == {k: src[k] for k in carried}
    # spread objective windows: the rebuild scores the same spread windows (other ones would not match)
    spread_src = json.load(open(os.path.join(first, tag, "search-wanda-s0.50-default+spread.json"), encoding="utf-8"))
    spread = json.load(open(os.path.join(second, tag, "search-wanda-s0.50-default+spread.json"), encoding="utf-8"))
    assert spread_src["objective_spread"] is True and spread["objective_spread"] is True
    assert spread["rebuilt_value"] == spread_src["search"]["shipped_value"] != src["search"]["shipped_value"]
    # a kl objective on the validation windows: the rebuild stores the dense distribution before it prunes
    kl_src = json.load(open(os.path.join(first, tag, "search-wanda-s0.50-default+klw.json"), encoding="utf-8"))
    kl = json.load(open(os.path.join(second, tag, "search-wanda-s0.50-default+klw.json"), encoding="utf-8"))
    assert kl_src["objective"] == "kl" and kl_src["objective_text"] == "wikitext2"
    assert kl["rebuilt_value"] == kl_src["search"]["shipped_value"] and kl["rebuilt_value"] > 0


def test_a_sparsegpt_search_cell_is_rebuilt_exactly_and_shows_its_factors(tiny_llama, data_dir, tmp_path):
    """The SparseGPT-base search (oneshot trials, the tool's default): its cell records the trial mode and the
    factors it held, the table row shows them, and --profiles_from rebuilds the model it shipped bit for bit
    (SparseGPT moves the weights it keeps, so only its own procedure gives them back), with the dense model's
    Hessians or the uniform sequential pruning's (``+su``)."""
    import json

    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_search.py")
    common = [sys.executable, script, "--model", tiny_llama, "--data_dir", data_dir, "--seqlen", "32",
              "--nsamples", "4", "--objective_nsamples", "2", "--n_trials", "6", "--budget", "3", "--threads", "1",
              "--c4_windows", "2", "--test_windows", "3", "--targets", "0.5", "--methods", "sparsegpt",
              "--cells", "search", "--variants", "default", "default+su"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    for args in (["--cells_dir", first], ["--cells_dir", second, "--profiles_from", first]):
        run = subprocess.run([*common, *args], capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr[-2000:]
    tag, name = os.path.basename(tiny_llama), "search-sparsegpt-s0.50-default.json"
    src = json.load(open(os.path.join(first, tag, name), encoding="utf-8"))
    out = json.load(open(os.path.join(second, tag, name), encoding="utf-8"))
    assert src["trial_mode"] == "oneshot" and src["search"]["shipped"] in ("oneshot", "sequential")
    assert out["rebuilt_value"] == src["search"]["shipped_value"] and out["wikitext2_test"] == src["wikitext2_test"]
    # trials from the uniform sequential pruning's Hessians (the profile says so): rebuilt as exactly
    su = [json.load(open(os.path.join(d, tag, "search-sparsegpt-s0.50-default+su.json"), encoding="utf-8"))
          for d in (first, second)]
    assert su[0]["trial_stats"] == "uniform" and su[0]["profile"]["meta"]["trial_stats"] == "uniform"
    assert su[1]["rebuilt_value"] == su[0]["search"]["shipped_value"]
    assert su[0]["search"]["uniform_value"] != src["search"]["uniform_value"]  # trial 0: other Hessians
    memory = src["search"]["memory"]
    factors = memory["oneshot_host_bytes"] / memory["decoder_linear_bytes"]
    assert memory["oneshot_band_bytes"] == 0 and 0 < factors
    row = next(line for line in load_script("bench_search").markdown({"s": src}, tag).splitlines() if "0.50 |" in line)
    assert f"0.00x band + 1.00x host copy + {factors:.2f}x SparseGPT factors" in row


def test_restarts_cell_ships_what_the_seed_cells_read_as_restarts(tiny_llama, data_dir, tmp_path):
    """``+x3`` runs --restarts 3 in one search: its restarts' best values are the seed cells' (same trials), and it
    ships the model of the seed the restarts table picks (same test perplexity)."""
    import json

    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_search.py")
    cells_dir = str(tmp_path / "cells")
    run = subprocess.run([sys.executable, script, "--model", tiny_llama, "--data_dir", data_dir, "--seqlen", "32",
                          "--nsamples", "4", "--objective_nsamples", "2", "--n_trials", "6", "--budget", "3",
                          "--threads", "1", "--c4_windows", "2", "--test_windows", "3", "--targets", "0.6",
                          "--methods", "optspa", "--cells", "search", "--cells_dir", cells_dir, "--variants",
                          "default", "default+seed1", "default+seed2", "default+x3"],
                         capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    tag = os.path.basename(tiny_llama)

    def cell(variant):
        return json.load(open(os.path.join(cells_dir, tag, f"search-optspa-s0.60-{variant}.json"), encoding="utf-8"))

    seeds = [cell(v) for v in ("default", "default+seed1", "default+seed2")]
    x3 = cell("default+x3")
    assert x3["restarts"] == 3 and x3["search"]["restart_values"] == [c["search"]["best_value"] for c in seeds]
    picked = min(seeds, key=lambda c: c["search"]["shipped_value"])
    assert x3["search"]["shipped_value"] == picked["search"]["shipped_value"]
    assert x3["wikitext2_test"] == picked["wikitext2_test"]
    assert x3["search"]["cost_evals"] == sum(c["search"]["cost_evals"] for c in seeds)
    # each restart's best re-pruned: their time is recorded beside the evaluations and shown in the table's row
    assert x3["search"]["reprune_seconds"] > 0 and x3["search"]["reprune_evals"] > 0
    row = next(line for line in load_script("bench_search").markdown({"x3": x3}, tag).splitlines()
               if "default+x3" in line)
    assert f"+ {x3['search']['reprune_evals']:.0f} re-pruning |" in row


def test_kvafter_scores_the_searched_model_under_a_uniform_kv_cache(tiny_llama, data_dir, tmp_path):
    """--cells kvafter: the sparsity-only search's shipped model, rebuilt from its cell, evaluated with a uniform
    KV cache (what a joint search at that KV budget must beat); refused with one line when the cell is missing."""
    import json

    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_search.py")
    common = [sys.executable, script, "--model", tiny_llama, "--data_dir", data_dir, "--seqlen", "32",
              "--nsamples", "4", "--objective_nsamples", "2", "--n_trials", "6", "--budget", "3", "--threads", "1",
              "--c4_windows", "2", "--test_windows", "3", "--targets", "0.5", "--methods", "wanda",
              "--variants", "default", "--kv_avg", "3", "--kv_group_size", "16", "--cells_dir", str(tmp_path)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    missing = subprocess.run([*common, "--cells", "kvafter"], capture_output=True, text=True, env=env)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "--cells kvafter: no cell" in missing.stderr
    run = subprocess.run([*common, "--cells", "search", "kvafter"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    tag = os.path.basename(tiny_llama)
    src = json.load(open(os.path.join(tmp_path, tag, "search-wanda-s0.50-default.json"), encoding="utf-8"))
    out = json.load(open(os.path.join(tmp_path, tag, "kvafter-search-wanda-s0.50-default-kv3.json"),
                         encoding="utf-8"))
    assert out["rebuilt_value"] == src["search"]["shipped_value"]  # the searched model itself
    assert out["key_bits"] == out["value_bits"] == [3, 3] and out["allocation"] == "kv-after-search"
    assert out["actual_sparsity"] == src["actual_sparsity"] and out["wikitext2_test"] != src["wikitext2_test"]
    assert "then KV uniform 3 bits" in load_script("bench_search").markdown({"kv": out}, tag)


TRIAL_STOPS = os.path.join(os.path.dirname(__file__), "..", "scripts", "trial_stops.py")
TREND_LAYER_CELL = {"pruner": "median", "granularity": "trend_layer", "coarse_fraction": 0.5,
                    "search": {"cost_evals": 4.0, "objective_windows": 4}}


def _trial_stops(folder, cells: dict[str, tuple[dict, str]]) -> tuple[dict[str, str], str]:
    """Write each cell's JSON and trials CSV into ``folder`` and run scripts/trial_stops.py on it: each cell's
    line (after its name) and the whole output."""
    for name, (cell, trials) in cells.items():
        (folder / f"{name}.json").write_text(json.dumps(cell))
        (folder / f"{name}.trials.csv").write_text(trials)
    run = subprocess.run([sys.executable, TRIAL_STOPS, str(folder)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return dict(line.split("\t", 1) for line in run.stdout.splitlines() if line.startswith("search-")), run.stdout


def test_trial_stops_counts_stopped_trials_by_windows_and_refuses_an_empty_folder(tmp_path):
    csv_text = "number,state,value,windows\n0,COMPLETE,1.0,8\n1,PRUNED,9.0,1\n2,PRUNED,9.0,1\n3,PRUNED,9.0,3\n"
    out, text = _trial_stops(tmp_path, {"search-x": ({"pruner": "median"}, csv_text)})
    assert out["search-x"] == "median\t1:2 3:1"
    assert "total\tmedian\tafter 1 window: 2" in text and "total\tmedian\tlater: 1" in text
    bad = subprocess.run([sys.executable, TRIAL_STOPS, str(tmp_path / "none")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_trial_stops_splits_a_trend_layer_cell_by_stage_as_the_search_switches(tmp_path):
    """The trend stage holds the trials begun before its share of the budget was spent (stopped trials cost
    their windows); each stage reports its stopped trials and best complete value."""
    # budget 4: the trend stage spends 2 evaluations (trials 0-2: 1 + 0.25 + 1), trial 3 starts the layer stage
    cell = {**TREND_LAYER_CELL, "search": {"cost_evals": 4.25, "objective_windows": 4}}
    csv_text = ("number,state,value,windows\n0,COMPLETE,10.0,4\n1,PRUNED,50.0,1\n2,COMPLETE,8.0,4\n"
                "3,COMPLETE,7.0,4\n4,PRUNED,9.0,1\n5,COMPLETE,7.5,4\n")
    out, _ = _trial_stops(tmp_path, {"search-t": (cell, csv_text)})
    assert out["search-t"].endswith("trend 1/3 stopped, best 8.00; layer 1/3 stopped, best 7.00")


def test_trial_stops_reads_each_trials_stage_and_replays_old_csvs_restart_by_restart(tmp_path):
    """A CSV with a ``stage`` column is split by it; an older one with restarts is replayed per restart (each
    restart spends its own budget), not by trial number across restarts."""
    out, _ = _trial_stops(tmp_path, {
        "search-a": (TREND_LAYER_CELL, "number,stage,state,value,windows\n0,trend,COMPLETE,10.0,4\n"
                                       "1,layer,COMPLETE,6.0,4\n2,trend,PRUNED,50.0,1\n3,layer,COMPLETE,7.0,4\n"),
        # two restarts of budget 2 each: trials 0 of each restart are the trend stage, trials 1 the layer stage
        "search-b": (TREND_LAYER_CELL, "restart,number,state,value,windows\n1,0,COMPLETE,9.0,4\n"
                                       "1,1,COMPLETE,5.0,4\n0,0,COMPLETE,10.0,4\n0,1,COMPLETE,8.0,4\n")})
    assert out["search-a"].endswith("trend 1/2 stopped, best 10.00; layer 0/2 stopped, best 6.00")
    assert out["search-b"].endswith("trend 0/2 stopped, best 9.00; layer 0/2 stopped, best 5.00")


def test_rank_cell_scores_each_profile_three_ways_and_the_uniform_one_agrees(tiny_llama, data_dir, tmp_path):
    """The rank cell: random profiles pruned oneshot from the dense model's statistics, oneshot from the uniform
    sequential pruning's, and sequentially; the first profile is the uniform one, whose oneshot model from the
    uniform pruning's statistics is the sequential model itself (the same value, exactly)."""
    import json

    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_search.py")
    cells_dir = str(tmp_path / "cells")
    run = subprocess.run([sys.executable, script, "--model", tiny_llama, "--data_dir", data_dir, "--seqlen", "32",
                          "--nsamples", "4", "--objective_nsamples", "2", "--threads", "1", "--c4_windows", "2",
                          "--test_windows", "3", "--targets", "0.6", "--methods", "sparsegpt", "wanda",
                          "--cells", "rank", "--cells_dir", cells_dir, "--rank_profiles", "5", "--rank_nsamples", "3"],
                         capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    tag = os.path.basename(tiny_llama)
    for method in ("sparsegpt", "wanda"):
        c = json.load(open(os.path.join(cells_dir, tag, f"rank-{method}-s0.60-n5.json"), encoding="utf-8"))
        assert c["calib_windows"] == 3 and len(c["oneshot"]) == len(c["oneshot_uniform_stats"]) == 5
        assert c["oneshot_uniform_stats"][0] == c["sequential"][0] != c["oneshot"][0]
        bench = load_script("bench_search")
        assert c["spearman"] == bench.spearman(c["oneshot"], c["sequential"]) and -1 <= c["spearman"] <= 1
        assert "with the trials' statistics from the uniform" in bench.markdown({"r": c}, tag)
