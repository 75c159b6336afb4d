"""Layer-wise allocation search: feasibility by construction, reproducibility, resume, shared studies, profiles,
OWL, and bad flag combinations. Tiny models, few trials, few objective windows."""
import csv
import json
import os
import random
import subprocess
import sys
import uuid

import optuna
import pytest
import torch

from conftest import ROOT, run_cli
from lib import data
from lib.models import load_model
from lib.owl import outlier_ratios, owl_allocation
from lib.profile import Profile
from lib.prune import check_sparsity, prune_optspa
from lib.search import (DenseSnapshot, OneShotPruner, SearchConfig, SearchSpace, dense_input_stats,
                        realize, realized_sparsity, run_search)
from lib.sparsity import SparsityType

COMMON = ["--nsamples", "4", "--seqlen", "32", "--objective_nsamples", "2", "--kv_group_size", "16"]  # tiny models: head_dim 16
TESTBED_LAYER = {"self_attn.q_proj": (192, 192), "self_attn.k_proj": (64, 192), "self_attn.v_proj": (64, 192),
                 "self_attn.o_proj": (192, 192), "mlp.gate_proj": (512, 192), "mlp.up_proj": (512, 192),
                 "mlp.down_proj": (192, 512)}


def _shapes(num_layers):
    return {(i, n): s for i in range(num_layers) for n, s in TESTBED_LAYER.items()}


def _args(model, data_dir, *extra):
    return ["--model", model, "--data_dir", data_dir, *COMMON, *extra]


# ------------------------------------------------------------------------------------ feasibility by construction
@pytest.mark.parametrize("granularity,num_layers,num_blocks", [("block", 8, 8), ("block", 7, 3), ("layer", 8, 8),
                                                                ("module", 4, 8)])
@pytest.mark.parametrize("target", [0.5, 0.6, 0.03])
def test_every_raw_sample_maps_to_the_target(granularity, num_layers, num_blocks, target):
    shapes = _shapes(num_layers)
    cfg = SearchConfig(target=target, granularity=granularity, num_blocks=num_blocks)
    space = SearchSpace(cfg, shapes, num_layers)
    rng = random.Random(0)
    total = sum(r * c for r, c in shapes.values())
    for _ in range(200):
        raw = [rng.randint(space.k_lo, space.k_hi) for _ in space.groups]
        ratios, offsets = space.sparsity_from_offsets(raw)
        assert all(space.k_lo <= o <= space.k_hi for o in offsets)
        assert all(target - 0.05 - 1e-6 <= r <= target + 0.05 + 1e-6 and r >= 0 for r in ratios)
        unit = {u: ratios[g] for g, members in enumerate(space.groups) for u in members}
        mean = sum(unit[u] * r * c for u, (r, c) in shapes.items()) / total
        assert mean == pytest.approx(target, abs=1e-9)
        # ...and the pruned counts, not only the nominal ratios, hit the target.
        assert abs(realized_sparsity(shapes, realize(shapes, unit, target)) - target) <= 1e-3
    if granularity != "block" or num_layers % num_blocks == 0:  # equal units: exactly on the grid
        assert all(abs((r - target) / cfg.sparsity_step - round((r - target) / cfg.sparsity_step)) < 1e-6 for r in ratios)


@pytest.mark.parametrize("choices,budget", [((6, 8), None), ((4, 6, 8), 6.5), ((2, 4, 8, 16), 5.0)])
def test_kv_bits_always_within_budget(choices, budget):
    cfg = SearchConfig(target=0.5, kind="kv", kv_bits_choices=choices, kv_avg_bits=budget)
    space = SearchSpace(cfg, _shapes(8), 8)
    rng = random.Random(1)
    for _ in range(200):
        bits = space.kv_from_priorities([rng.random() for _ in range(8)])
        assert set(bits) <= set(choices) and len(bits) == 8
        assert sum(bits) / 8 <= cfg.kv_budget + 1e-9
        # Budget is spent: no single raise would still fit.
        higher = [min([c for c in choices if c > b], default=None) for b in bits]
        assert all(h is None or sum(bits) - b + h > cfg.kv_budget * 8 + 1e-9 for b, h in zip(bits, higher))


def test_owl_allocation_mean_shape_and_direction(tiny_llama):
    ratios = owl_allocation([0.01, 0.05, 0.02, 0.03], 0.6, 0.08)
    assert len(ratios) == 4 and sum(ratios) / 4 == pytest.approx(0.6, abs=1e-12)
    assert max(ratios) - min(ratios) == pytest.approx(0.16) and ratios[1] == min(ratios) and ratios[0] == max(ratios)
    assert owl_allocation([0.02] * 3, 0.5) == [0.5] * 3
    lm = load_model(tiny_llama, dtype="float32")
    calib = [torch.randint(5, len(lm.tokenizer), (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    out = outlier_ratios(lm.model, dense_input_stats(lm.model, calib, "cpu"), 5.0)
    assert len(out) == 2 and all(0 <= o < 1 for o in out)


def test_oneshot_thresholding_matches_the_optspa_pruner_on_layer_0(tiny_llama):
    lm = load_model(tiny_llama, dtype="float32")
    calib = [torch.randint(5, len(lm.tokenizer), (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    snap = DenseSnapshot(lm.model)
    pruner = OneShotPruner(snap, dense_input_stats(lm.model, calib, "cpu"))
    pruner.apply({u: 0.5 for u in snap.modules})
    oneshot = {u: (m.weight.data == 0).clone() for u, m in snap.modules.items()}
    snap.restore()
    assert check_sparsity(lm.model)[0] < 0.01  # restore really gives the dense weights back
    prune_optspa(lm.model, calib, Profile.uniform(2, 0.5), SparsityType())
    for u, m in snap.modules.items():
        if u[0] == 0:  # layer 0 sees the same inputs in both modes
            assert torch.equal(oneshot[u], m.weight.data == 0)


def test_oneshot_trials_in_sequence_equal_pruning_from_the_dense_snapshot(tiny_llama):
    """Trials only move the difference from the previous one; the weights must be exactly those of restoring the
    dense snapshot and pruning from scratch, whatever the sequence of ratios (up, down, zero, unchanged)."""
    lm = load_model(tiny_llama, dtype="float32")
    calib = [torch.randint(5, len(lm.tokenizer), (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    snap = DenseSnapshot(lm.model)
    pruner = OneShotPruner(snap, dense_input_stats(lm.model, calib, "cpu"))
    rng = random.Random(0)
    for step in range(6):
        ratios = {u: rng.choice([0.0, 0.3, 0.45, 0.5, 0.55, 0.7]) for u in snap.modules}
        pruner.apply(ratios)
        incremental = {u: m.weight.data.clone() for u, m in snap.modules.items()}
        pruner.forget()
        pruner.apply(ratios)  # from the snapshot
        for u, m in snap.modules.items():
            assert torch.equal(incremental[u], m.weight.data), (step, u)
            assert int((m.weight.data == 0).sum()) >= m.weight.shape[0] * int(m.weight.shape[1] * ratios[u])
    snap.restore()
    pruner.forget()
    assert check_sparsity(lm.model)[0] < 0.01


# ------------------------------------------------------------------------------------ library: seeds, resume
def _lib_search(model_dir, data_dir, save, objective_nsamples=2, **kw):
    lm = load_model(model_dir, dtype="float32")
    calib = data.get_calibration("c4", lm.tokenizer, 4, 0, 32, data_dir)
    ids = data.get_eval_tokens("wikitext2", lm.tokenizer, data_dir, "validation", 32)
    cfg = SearchConfig(**{"target": 0.5, "kind": "joint", "granularity": "module", "n_trials": 5,
                          "save_dir": str(save), **kw})
    return run_search(lm.model, cfg, calib=calib, objective_ids=ids, seqlen=32, objective_nsamples=objective_nsamples,
                      model_name="tiny", progress=False, kv_kwargs={"group_size": 16}), lm


def test_same_seed_same_trials_and_resume_does_not_redo(tiny_llama, data_dir, tmp_path):
    a, lm = _lib_search(tiny_llama, data_dir, tmp_path / "a", seed=3)
    b, _ = _lib_search(tiny_llama, data_dir, tmp_path / "b", seed=3)
    c, _ = _lib_search(tiny_llama, data_dir, tmp_path / "c", seed=4)
    params = lambda r: [(t["layer_sparsity"], t["kv_bits"]) for t in r.trials]  # noqa: E731
    assert params(a) == params(b) and params(a) != params(c)
    assert [t["value"] for t in a.trials] == pytest.approx([t["value"] for t in b.trials])
    assert a.wasted_fraction == 0 and all(t["feasible"] for t in a.trials)
    assert check_sparsity(lm.model)[0] < 0.01  # the search leaves the model dense

    # Resume: a stale RUNNING trial (a killed worker) and 5 completed ones; asking for 7 runs exactly 2 more.
    study = optuna.load_study(study_name=a.study_name, storage=a.storage)
    study.ask()
    more, _ = _lib_search(tiny_llama, data_dir, tmp_path / "a", seed=3, n_trials=7)
    complete = [t for t in more.trials if t["state"] == "COMPLETE"]
    assert len(complete) == 7
    assert [t["value"] for t in complete[:5]] == pytest.approx([t["value"] for t in a.trials])
    # Other search settings under the same study name are refused, not mixed in.
    from lib.search import SearchError

    with pytest.raises(SearchError, match="other search settings"):
        _lib_search(tiny_llama, data_dir, tmp_path / "a", seed=3, sparsity_step=0.05, study_name=a.study_name)
    # So are trials scored on other objective windows (their values would not be comparable).
    with pytest.raises(SearchError, match="scored on other data"):
        _lib_search(tiny_llama, data_dir, tmp_path / "a", seed=3, n_trials=7, objective_nsamples=1)


# ------------------------------------------------------------------------------------ command line
def test_cli_joint_search_writes_outputs_resumes_and_profile_reloads(tiny_llama, data_dir, tmp_path, capsys):
    save = tmp_path / "s"
    argv = _args(tiny_llama, data_dir, "--prune_method", "optspa", "--sparsity_ratio", "0.5", "--search", "joint",
                 "--search_granularity", "layer", "--n_trials", "4", "--save", str(save))
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    name = "profile_optspa_unstructured_s0.50_kv7.json"
    prof = json.load(open(save / name))
    assert prof["format"] == "optspa-profile" and prof["target_sparsity"] == 0.5
    assert prof["meta"]["study_name"] and prof["meta"]["objective"] == "ppl" and len(prof["kv_bits"]["key"]) == 2
    assert sum(prof["kv_bits"]["key"]) / 2 <= 7
    rows = list(csv.DictReader(open(save / "trials_joint_s0.50.csv")))
    assert len(rows) == 4 and all(abs(float(r["realized_sparsity"]) - 0.5) <= 1e-3 for r in rows)
    assert all(float(r["kv_avg_bits"]) <= 7 for r in rows) and all(r["feasible"] == "True" for r in rows)
    assert (save / "profile_joint_s0.50.png").read_bytes()[:4] == b"\x89PNG"
    assert (save / "search.db").exists() and not os.path.exists("search.db")
    res = json.load(open(save / "results_optspa.json"))
    assert res["actual_sparsity"] == pytest.approx(0.5, abs=1e-3) and res["search"]["wasted_fraction"] == 0

    # Same command again: resumes, runs no trial, ends with the same profile.
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "4 of 4 trials complete" in out and "trial 4:" not in out
    assert json.load(open(save / name))["sparsity"] == prof["sparsity"]

    # Reload without searching: same per-layer sparsity.
    code, out, err = run_cli(_args(tiny_llama, data_dir, "--prune_method", "optspa", "--sparsity_profile",
                                   str(save / name), "--save", str(tmp_path / "r")), capsys)
    assert code == 0, err
    again = json.load(open(tmp_path / "r" / "results_optspa.json"))
    assert again["per_layer_sparsity"] == pytest.approx(res["per_layer_sparsity"], abs=1e-9)
    assert "trial 0" not in out


def test_cli_kv_only_search_on_dense_model_and_owl(tiny_llama, data_dir, tmp_path, capsys):
    code, out, err = run_cli(_args(tiny_llama, data_dir, "--search", "kv", "--kv_bits_choices", "4", "8",
                                   "--n_trials", "3", "--save", str(tmp_path / "kv")), capsys)
    assert code == 0, err
    prof = json.load(open(tmp_path / "kv" / "profile_dense_unstructured_s0.00_kv6.json"))
    assert set(prof["kv_bits"]["key"]) <= {4, 8} and sum(prof["kv_bits"]["key"]) / 2 <= 6
    assert "KV cache" in out and "bytes per token" in out

    code, out, err = run_cli(_args(tiny_llama, data_dir, "--prune_method", "wanda", "--sparsity_ratio", "0.6",
                                   "--layer_allocation", "owl", "--save", str(tmp_path / "owl")), capsys)
    assert code == 0, err
    res = json.load(open(tmp_path / "owl" / "results_wanda.json"))
    assert res["actual_sparsity"] == pytest.approx(0.6, abs=1e-3)
    prof = json.load(open(tmp_path / "owl" / "profile_wanda_unstructured_s0.60.json"))
    assert prof["meta"]["allocation"] == "owl" and len(prof["sparsity"]) == 2


def test_original_fine_profile_loads(tiny_llama, data_dir, tmp_path, capsys):
    mods = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj"]
    fine = {f"{i}-{m}": (0.375 if i == 0 else 0.625) for i in range(2) for m in mods}
    (tmp_path / "fine.json").write_text(json.dumps(fine))
    code, _, err = run_cli(_args(tiny_llama, data_dir, "--prune_method", "optspa", "--sparsity_profile",
                                 str(tmp_path / "fine.json"), "--save", str(tmp_path / "o")), capsys)
    assert code == 0, err
    res = json.load(open(tmp_path / "o" / "results_optspa.json"))
    assert res["per_layer_sparsity"] == pytest.approx([0.375, 0.625], abs=0.01)


BAD = {
    "search needs optspa": (["--prune_method", "wanda", "--sparsity_ratio", "0.5", "--search", "sparsity"], "optspa"),
    "search needs unstructured": (["--prune_method", "optspa", "--sparsity_type", "2:4", "--search", "joint"], "2:4"),
    "unsupported kv bits": (["--search", "kv", "--kv_bits_choices", "7", "8"], "not supported"),
    "budget outside choices": (["--search", "kv", "--kv_avg_bits", "9"], "kv_avg_bits"),
    "search without save": (["--prune_method", "optspa", "--sparsity_ratio", "0.5", "--search", "sparsity",
                             "--no_save"], "--save"),
    "zero trials": (["--prune_method", "optspa", "--sparsity_ratio", "0.5", "--search", "sparsity", "--n_trials", "0"],
                    "n_trials"),
    "range below step": (["--prune_method", "optspa", "--sparsity_ratio", "0.5", "--search", "sparsity",
                          "--sparsity_range", "0.01"], "sparsity_range"),
    "owl without pruning": (["--layer_allocation", "owl"], "owl"),
    "owl with search": (["--prune_method", "optspa", "--sparsity_ratio", "0.5", "--search", "sparsity",
                         "--layer_allocation", "owl"], "owl"),
    "more blocks than layers": (["--prune_method", "optspa", "--sparsity_ratio", "0.5", "--search", "sparsity",
                                 "--num_blocks", "5"], "num_blocks"),
    "unreachable storage": (["--prune_method", "optspa", "--sparsity_ratio", "0.5", "--search", "sparsity",
                             "--storage", "sqlite:////nonexistent/dir/x.db"], "storage"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_search_flags_exit_2_with_one_line(tiny_llama, data_dir, tmp_path, capsys, case):
    extra, needle = BAD[case]
    save = [] if "--no_save" in extra else ["--save", str(tmp_path / "out")]
    extra = [e for e in extra if e != "--no_save"]
    code, _, err = run_cli(_args(tiny_llama, data_dir, *extra, *save), capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "out").exists()  # nothing written


# ------------------------------------------------------------------------------------ shared studies
def _worker(tiny_llama, data_dir, save, storage, study, seed):
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), *_args(tiny_llama, data_dir), "--prune_method", "optspa",
           "--sparsity_ratio", "0.5", "--search", "sparsity", "--search_granularity", "module", "--n_trials", "10",
           "--search_seed", str(seed), "--storage", storage, "--study_name", study, "--save", str(save),
           "--eval_datasets", "wikitext2"]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def test_two_processes_share_one_sqlite_study(tiny_llama, data_dir, tmp_path):
    storage, study = f"sqlite:///{tmp_path}/shared.db", "shared"
    procs = [_worker(tiny_llama, data_dir, tmp_path / f"w{i}", storage, study, i) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    ran = [sum(line.count(" trial ") and ": ppl " in line for line in out.splitlines()) for out, _ in outs]
    from lib.search import open_storage

    trials = optuna.load_study(study_name=study, storage=open_storage(storage)).trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert 10 <= len(complete) <= 11 and sum(ran) == len(complete)  # one overshoot possible at the finish
    assert all(t.user_attrs["feasible"] for t in complete)
    assert all(r >= 1 for r in ran), ran  # both processes contributed


def test_journal_file_study_shared_by_two_workers(tiny_llama, data_dir, tmp_path):
    """Optuna's journal file (for shared filesystems without a database): two workers with their own seeds
    append to one study; the second resumes from the first's trials."""
    storage = f"journal:{tmp_path}/study.journal.log"
    a, _ = _lib_search(tiny_llama, data_dir, tmp_path / "w0", storage=storage, study_name="j", n_trials=3, seed=0)
    b, _ = _lib_search(tiny_llama, data_dir, tmp_path / "w1", storage=storage, study_name="j", n_trials=6, seed=1)
    done = [t for t in b.trials if t["state"] == "COMPLETE"]
    assert len(done) == 6 and [t["value"] for t in done[:3]] == pytest.approx([t["value"] for t in a.trials])
    assert all(t["feasible"] for t in done)


@pytest.mark.skipif(not os.environ.get("OPTSPA_TEST_POSTGRES_URL"),
                    reason="OPTSPA_TEST_POSTGRES_URL is not set (CI starts a PostgreSQL server and sets it)")
def test_postgresql_storage_runs_and_resumes(tiny_llama, data_dir, tmp_path, capsys):
    url = os.environ["OPTSPA_TEST_POSTGRES_URL"]
    study = f"ci-{uuid.uuid4().hex[:8]}"
    argv = _args(tiny_llama, data_dir, "--prune_method", "optspa", "--sparsity_ratio", "0.5", "--search", "joint",
                 "--n_trials", "3", "--storage", url, "--study_name", study, "--save", str(tmp_path))
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    argv[argv.index("--n_trials") + 1] = "5"
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "3 of 5 trials complete" in out
    complete = [t for t in optuna.load_study(study_name=study, storage=url).trials if t.state.name == "COMPLETE"]
    assert len(complete) == 5


def test_kl_objective_and_sequential_mode(tiny_llama, data_dir, tmp_path):
    r, lm = _lib_search(tiny_llama, data_dir, tmp_path, kind="sparsity", granularity="layer", n_trials=2,
                        objective="kl", trial_mode="sequential")
    assert all(t["value"] > 0 for t in r.trials)  # pruning moves the distribution away from the dense one
    assert r.profile.meta["objective"] == "kl" and r.profile.meta["trial_mode"] == "sequential"
    assert check_sparsity(lm.model)[0] < 0.01


def test_killed_worker_loses_no_completed_trial_and_resume_finishes(tiny_llama, data_dir, tmp_path, capsys):
    """SIGKILL in the middle of a search: the SQLite study stays intact, completed trials survive, no output file
    is half-written, and the same command run again completes the study without redoing them."""
    import signal
    import sqlite3
    import time

    save = tmp_path / "out"
    extra = ["--prune_method", "optspa", "--sparsity_ratio", "0.5", "--search", "sparsity", "--search_granularity",
             "layer", "--n_trials", "25", "--study_name", "killme", "--save", str(save)]
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), *_args(tiny_llama, data_dir, *extra)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    db = save / "search.db"

    def complete() -> dict[int, float]:
        if not db.exists():
            return {}
        con = sqlite3.connect(db)
        try:
            rows = con.execute("SELECT t.number, v.value FROM trials t JOIN trial_values v ON v.trial_id = t.trial_id "
                               "WHERE t.state = 'COMPLETE'").fetchall()
        except sqlite3.OperationalError:  # tables not created yet
            rows = []
        finally:
            con.close()
        return dict(rows)

    deadline = time.time() + 240
    while len(complete()) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = complete()
    assert 3 <= len(before) < 25, "the worker was killed mid-search"
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    assert not [f for f in os.listdir(save) if f.endswith(".tmp")]

    code, out, err = run_cli(_args(tiny_llama, data_dir, *extra), capsys)
    assert code == 0, err
    after = complete()
    assert len(after) >= 25
    assert all(after[n] == pytest.approx(v) for n, v in before.items())  # kept, not redone

    # The study is readable by optuna-dashboard (its WSGI app, called directly: no server, no network).
    import io
    import json as _json

    from optuna_dashboard import wsgi

    app = wsgi(f"sqlite:///{db}")
    status = {}
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/studies", "QUERY_STRING": "", "SERVER_NAME": "localhost",
           "SERVER_PORT": "80", "wsgi.input": io.BytesIO(b""), "wsgi.url_scheme": "http"}
    studies = _json.loads(b"".join(app(env, lambda s, h, e=None: status.update(s=s))))
    assert status["s"].startswith("200") and studies["study_summaries"][0]["study_name"] == "killme"
    env["PATH_INFO"] = f"/api/studies/{studies['study_summaries'][0]['study_id']}"
    detail = _json.loads(b"".join(app(env, lambda s, h, e=None: status.update(s=s))))
    assert sum(t["state"] == "Complete" for t in detail["trials"]) >= 25


def test_objective_uses_what_the_text_holds_and_says_so(tiny_llama, caplog):
    """Asking for more objective windows than the validation text holds evaluates all of them, with a warning."""
    from lib.search import Objective
    lm = load_model(tiny_llama, dtype="float32")
    ids = torch.randint(0, lm.model.config.vocab_size, (1, 3 * 32 + 5))
    with caplog.at_level("WARNING", logger="lib.search"):
        obj = Objective(lm.model, ids, 32, 64, "cpu", False)
    assert obj.nwin == 3 and obj.ids.shape[1] == 96
    assert "holds 3 windows" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lib.search"):
        assert Objective(lm.model, ids, 32, 2, "cpu", False).nwin == 2
    assert "holds" not in caplog.text


def test_sparsity_search_on_an_already_pruned_model_warns(tiny_llama, data_dir, caplog):
    """Trials restore to the weights the search starts from: a pre-pruned start is flagged, a dense one is not."""
    from lib.search import TrialRunner
    lm = load_model(tiny_llama, dtype="float32")
    ids = data.get_eval_tokens("wikitext2", lm.tokenizer, data_dir, "validation", 32)
    cfg = SearchConfig(target=0.5, kind="sparsity", granularity="layer", trial_mode="sequential", save_dir=None)
    with caplog.at_level("WARNING", logger="lib.search"):
        TrialRunner(lm.model, cfg, None, ids, 32, 1, "cpu", False)
    assert "already" not in caplog.text
    calib = data.get_calibration("c4", lm.tokenizer, 4, 0, 32, data_dir)
    prune_optspa(lm.model, calib, Profile.uniform(len(lm.model.model.layers), 0.5), SparsityType())
    with caplog.at_level("WARNING", logger="lib.search"):
        TrialRunner(lm.model, cfg, None, ids, 32, 1, "cpu", False)
    assert "already 50.0% zeros" in caplog.text
