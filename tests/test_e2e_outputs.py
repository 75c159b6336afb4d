"""main.main end to end on the tiny models: what each kind of run writes into --save (and nothing else), what
--save_model writes back, the Wanda variant, wikitext2 calibration, half-precision pruning on the CPU, one
KV simulation for every evaluation, and the README's bad-input list, entry by entry."""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from conftest import ROOT, run_cli
from lib.eval import eval_ppl, run_evaluations
from lib.kvquant import KVQuantConfig, active_kv_simulation, simulate_kv_quant
from lib.masks import load_masks, save_masks
from lib.models import decoder_layers, find_linears, load_model

COMMON = ["--nsamples", "4", "--seqlen", "32", "--calib_dataset", "c4"]


def _args(model, data_dir, *extra):
    return ["--model", model, "--data_dir", data_dir, *COMMON, *extra]


def _run(capsys, *argv):
    code, out, err = run_cli(list(argv), capsys)
    assert code == 0, err
    return out


def _files(folder) -> set[str]:
    return set(os.listdir(folder))


@pytest.fixture(scope="module")
def half_llamas(tiny_llama, tmp_path_factory) -> dict[str, str]:
    """The tiny LLaMA stored as float16 and as bfloat16 checkpoints (tokenizer files copied along)."""
    out = {}
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        folder = str(tmp_path_factory.mktemp(f"tiny-llama-{name}"))
        for f in os.listdir(tiny_llama):
            if "token" in f or f.endswith(".txt"):
                shutil.copy(os.path.join(tiny_llama, f), folder)
        lm = load_model(tiny_llama, dtype="float32")
        lm.model.config.use_cache = True  # as a hub checkpoint has it
        lm.model.to(dtype).save_pretrained(folder)
        out[name] = folder
    return out


# ------------------------------------------------------------------------------ what each run writes
def test_each_kind_of_run_writes_exactly_its_files(tiny_llama, data_dir, tmp_path, capsys):
    dense = tmp_path / "dense"
    _run(capsys, *_args(tiny_llama, data_dir, "--save", str(dense)))
    assert _files(dense) == {"log_dense.txt", "results_dense.json"}

    dense_kv = tmp_path / "dense_kv"
    _run(capsys, *_args(tiny_llama, data_dir, "--kv_bits", "8", "--kv_group_size", "16", "--save", str(dense_kv)))
    assert _files(dense_kv) == {"log_dense.txt", "results_dense.json", "profile_dense_unstructured_s0.00_kv8.json"}

    mag = tmp_path / "magnitude"
    _run(capsys, *_args(tiny_llama, data_dir, "--prune_method", "magnitude", "--sparsity_ratio", "0.5",
                        "--save", str(mag)))
    assert _files(mag) == {"log_magnitude.txt", "results_magnitude.json", "masks.safetensors", "masks.json",
                           "profile_magnitude_unstructured_s0.50.json"}
    res = json.load(open(mag / "results_magnitude.json"))
    assert res["nsamples"] is None and res["calib_dataset"] is None  # magnitude calibrates nothing

    sgpt = tmp_path / "sparsegpt"
    _run(capsys, *_args(tiny_llama, data_dir, "--prune_method", "sparsegpt", "--sparsity_type", "2:4",
                        "--kv_bits", "4", "--kv_group_size", "16", "--save", str(sgpt)))
    assert _files(sgpt) == {"log_sparsegpt.txt", "results_sparsegpt.json", "masks.safetensors", "masks.json",
                            "profile_sparsegpt_2-4_s0.50_kv4.json"}


def test_masks_run_records_the_manifest_and_writes_no_profile(tiny_llama, data_dir, tmp_path, capsys):
    first = tmp_path / "first"
    _run(capsys, *_args(tiny_llama, data_dir, "--prune_method", "wanda", "--sparsity_type", "2:4",
                        "--nsamples", "3", "--save", str(first)))
    again = tmp_path / "again"
    _run(capsys, "--model", tiny_llama, "--data_dir", data_dir, "--seqlen", "32", "--masks", str(first),
         "--save", str(again))
    assert _files(again) == {"log_wanda.txt", "results_wanda.json"}  # no profile of all zeros, no masks copy
    res = json.load(open(again / "results_wanda.json"))
    assert res["method"] == "wanda" and res["sparsity_type"] == "2:4" and res["target_sparsity"] == 0.5
    assert res["nsamples"] == 3 and res["calib_dataset"] == "c4" and res["masks"] == str(first)
    assert res["actual_sparsity"] == pytest.approx(0.5, abs=1e-4) and res["calib_seconds"] == 0.0


# ------------------------------------------------------------------------------ --save_model
def test_saved_model_is_the_original_config_plus_zeros(tiny_llama, data_dir, tmp_path, capsys):
    saved = tmp_path / "m"
    _run(capsys, *_args(tiny_llama, data_dir, "--prune_method", "magnitude", "--sparsity_ratio", "0.5",
                        "--save", str(tmp_path / "o"), "--save_model", str(saved)))
    original = json.load(open(os.path.join(tiny_llama, "config.json")))
    assert json.load(open(saved / "config.json")) == original  # no use_cache: false, same dtype


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_checkpoint_computes_in_float32_on_cpu_and_saves_back_in_its_dtype(half_llamas, data_dir, tmp_path,
                                                                                 capsys, dtype):
    src, saved = half_llamas[dtype], tmp_path / "m"
    out = _run(capsys, *_args(src, data_dir, "--prune_method", "wanda", "--sparsity_ratio", "0.5", "--device", "cpu",
                              "--save", str(tmp_path / "o"), "--save_model", str(saved)))
    assert "dtype torch.float32" in out  # the CPU computes in float32 ...
    assert json.load(open(saved / "config.json")) == json.load(open(os.path.join(src, "config.json")))
    back = load_model(str(saved), dtype=dtype)  # ... and the checkpoint comes back as it was stored, plus zeros
    assert back.model.dtype == getattr(torch, dtype)
    assert os.path.getsize(saved / "model.safetensors") == pytest.approx(os.path.getsize(
        os.path.join(src, "model.safetensors")), rel=0.01)
    masks, _ = load_masks(str(tmp_path / "o"))
    params = dict(back.model.named_parameters())
    assert all(torch.equal(params[n] == 0, m) for n, m in masks.items())


# ------------------------------------------------------------------------------ variants of pruning
def test_use_variant_prunes_per_row_alpha(tiny_llama, data_dir, tmp_path, capsys):
    _run(capsys, *_args(tiny_llama, data_dir, "--prune_method", "wanda", "--sparsity_ratio", "0.5", "--use_variant",
                        "--save", str(tmp_path)))
    res = json.load(open(tmp_path / "results_wanda.json"))
    assert res["actual_sparsity"] == pytest.approx(0.5, abs=0.01)
    masks, _ = load_masks(str(tmp_path))
    per_row = torch.cat([m.sum(1) for m in masks.values()])
    assert len(set(per_row.tolist())) > 1  # unlike plain Wanda's exactly cols/2 per row


def test_calibration_on_wikitext2(tiny_llama, data_dir, tmp_path, capsys):
    for ds in ("c4", "wikitext2"):
        _run(capsys, *_args(tiny_llama, data_dir, "--prune_method", "wanda", "--sparsity_ratio", "0.5",
                            "--calib_dataset", ds, "--save", str(tmp_path / ds)))
    res = json.load(open(tmp_path / "wikitext2" / "results_wanda.json"))
    assert res["calib_dataset"] == "wikitext2" and json.load(open(tmp_path / "wikitext2" / "masks.json"))[
        "calib_dataset"] == "wikitext2"
    c4, _ = load_masks(str(tmp_path / "c4"))
    wiki, _ = load_masks(str(tmp_path / "wikitext2"))
    assert any(not torch.equal(c4[k], wiki[k]) for k in c4)  # the calibration text really changed


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("sparsegpt", "2:4")])
def test_half_precision_pruning_on_cpu(tiny_llama, data_dir, tmp_path, capsys, dtype, method, pattern):
    extra = ["--sparsity_ratio", "0.5"] if pattern == "unstructured" else ["--sparsity_type", pattern]
    out = _run(capsys, *_args(tiny_llama, data_dir, "--prune_method", method, *extra, "--dtype", dtype,
                              "--save", str(tmp_path / "o"), "--save_model", str(tmp_path / "m")))
    assert f"dtype torch.{dtype}" in out
    res = json.load(open(tmp_path / "o" / f"results_{method}.json"))
    assert res["actual_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert 1 < res["ppl"]["wikitext2"] < 1e4
    back = load_model(str(tmp_path / "m"), dtype=dtype)
    assert back.model.dtype == getattr(torch, dtype)  # asked for explicitly: saved in it
    for layer in decoder_layers(back.model):
        for mod in find_linears(layer).values():
            assert int((mod.weight == 0).sum()) >= mod.weight.numel() // 2


# ------------------------------------------------------------------------------ one KV simulation
def test_every_evaluation_runs_under_the_one_kv_simulation(tiny_llama, data_dir):
    import main
    from lib.data import get_eval_tokens

    lm = load_model(tiny_llama, dtype="float32")
    ids = get_eval_tokens("wikitext2", lm.tokenizer, data_dir, "test", 32)
    kv = KVQuantConfig.uniform(2, 2, group_size=16)
    with simulate_kv_quant(lm.model, kv):
        quantized = eval_ppl(lm.model, ids, 32)
    full = eval_ppl(lm.model, ids, 32)
    assert quantized != pytest.approx(full, rel=1e-3)
    out = run_evaluations(lm.model, kv, {"ppl": lambda: eval_ppl(lm.model, ids, 32),
                                         "seen": lambda: active_kv_simulation(lm.model)})
    assert out["ppl"] == pytest.approx(quantized, rel=1e-6) and out["seen"] is kv
    assert active_kv_simulation(lm.model) is None  # over after the evaluations
    # main.py's evaluation stage hands the zero-shot tasks to the same run_evaluations call as perplexity.
    args = main.build_parser().parse_args(["--model", tiny_llama, "--eval_zero_shot", "--eval_datasets", "c4"])
    plan = main.evaluation_plan(main.Run(args=args, pattern=None, device="cpu", loaded=lm, seqlen=32))
    assert list(plan) == ["ppl:c4", "zero_shot"]


def test_zero_shot_numbers_record_the_kv_setting(tiny_llama, data_dir, tmp_path, capsys):
    pytest.importorskip("lm_eval", reason="lm-eval-harness is optional (pip install lm-eval) and not installed")
    _run(capsys, *_args(tiny_llama, data_dir, "--kv_bits", "4", "--kv_group_size", "16", "--eval_zero_shot",
                        "--save", str(tmp_path)))
    res = json.load(open(tmp_path / "results_dense.json"))
    assert res["zero_shot"]["kv"] == KVQuantConfig.uniform(4, 2, group_size=16).describe()


# ------------------------------------------------------------------------------ README bad-input list
def _bad_cases(tiny_llama, data_dir, inputs) -> dict[str, tuple[list[str], str]]:
    """README entry id -> (arguments, text the one stderr line must contain)."""
    m = lambda *a: ["--model", tiny_llama, "--data_dir", data_dir, "--seqlen", "32", *a]  # noqa: E731
    w = lambda *a: m("--prune_method", "wanda", "--sparsity_ratio", "0.5", *a)  # noqa: E731
    return {
        "ratio_outside": (m("--prune_method", "wanda", "--sparsity_ratio", "1.0"), "outside [0, 1)"),
        "no_ratio": (m("--prune_method", "wanda"), "needs --sparsity_ratio"),
        "nm_ratio_mismatch": (m("--prune_method", "wanda", "--sparsity_type", "2:4", "--sparsity_ratio", "0.6"),
                              "2:4"),
        "nm_malformed": (m("--prune_method", "wanda", "--sparsity_type", "5:4"), "need 0 < N < M"),
        "unknown_method": (m("--prune_method", "pruneall", "--sparsity_ratio", "0.5"), "invalid choice"),
        "variant_not_wanda": (m("--prune_method", "magnitude", "--sparsity_ratio", "0.5", "--use_variant"),
                              "wanda only"),
        "variant_nm": (m("--prune_method", "wanda", "--sparsity_type", "2:4", "--use_variant"), "unstructured"),
        "nsamples_zero": (w("--nsamples", "0"), "--nsamples"),
        "seqlen_one": (m("--prune_method", "wanda", "--sparsity_ratio", "0.5", "--seqlen", "1"), "--seqlen"),
        "bad_device": (w("--device", "nonsense"), "--device nonsense"),
        "model_missing": (["--model", str(inputs / "no-model"), "--prune_method", "magnitude", "--sparsity_ratio",
                           "0.5"], "cannot load model"),
        "data_missing": (["--model", tiny_llama, "--data_dir", str(inputs / "empty"), "--prune_method", "wanda",
                          "--sparsity_ratio", "0.5"], "not found"),
        "save_unwritable": (w("--save", "/proc/optspa-never/out"), "--save"),
        "save_model_unwritable": (w("--save_model", "/proc/optspa-never/m"), "--save_model"),
        "save_is_a_file": (w("--save", str(inputs / "a-file" / "sub")), "not a directory"),
        "masks_missing": (m("--masks", str(inputs / "no-masks")), "does not exist"),
        "masks_with_method": (m("--masks", str(inputs / "masks"), "--prune_method", "wanda", "--sparsity_ratio",
                                "0.5"), "do not combine"),
        "masks_with_profile": (m("--masks", str(inputs / "masks"), "--sparsity_profile",
                                 str(inputs / "blocks.json")), "do not combine"),
        "masks_other_model": (m("--masks", str(inputs / "masks")), "matches no prunable weight"),
        "masks_corrupt": (m("--masks", str(inputs / "corrupt")), "checksum"),
        "profile_missing": (w("--sparsity_profile", str(inputs / "none.json")), "does not exist"),
        "profile_unreadable": (w("--sparsity_profile", str(inputs / "bad.json")), "not valid JSON"),
        "profile_code": (w("--sparsity_profile", str(inputs / "code.txt")), "not valid JSON"),
        "profile_wrong_layers": (w("--sparsity_profile", str(inputs / "layers32.json")), "32 decoder layers"),
        "profile_nm_varies": (m("--prune_method", "wanda", "--sparsity_type", "2:4", "--sparsity_profile",
                                str(inputs / "blocks.json"), "--num_blocks", "2"), "uniform by construction"),
        "kv_bits_invalid": (m("--kv_bits", "7"), "invalid choice"),
        "kv_group": (m("--kv_bits", "8"), "divide head_dim"),
        "kv_profile_layers": (m("--kv_profile", "8x3", "--kv_group_size", "16"), "3 layers"),
        "kv_bits_and_profile": (m("--kv_bits", "8", "--kv_profile", "8x2", "--kv_group_size", "16"), "not both"),
        "search_without_save": (m("--prune_method", "wanda", "--sparsity_ratio", "0.5", "--search", "kv"),
                                "--search needs --save"),
        "zero_shot_without_lm_eval": (m("--eval_zero_shot"), "pip install lm-eval"),
    }


def _readme_bad_ids() -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"<!-- bad_input:start -->\n(.*?)\n<!-- bad_input:end -->", text, flags=re.S)
    assert block, "README lacks the bad_input list"
    lines = block.group(1).splitlines()
    assert all(line.startswith("- `") for line in lines), "one line per entry"
    return [line.split("`")[1] for line in lines]


@pytest.fixture
def bad_inputs(tmp_path, tiny_llama):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "empty").mkdir()
    (inputs / "a-file").write_text("x")
    (inputs / "blocks.json").write_text(json.dumps({"0": 0.25, "1": 0.75}))
    (inputs / "bad.json").write_text("{not json")
    (inputs / "code.txt").write_text(f"__import__('os').makedirs({str(tmp_path / 'out' / 'ran')!r})")
    (inputs / "layers32.json").write_text(json.dumps({"format": "optspa-profile", "version": 1, "num_layers": 32,
                                                      "sparsity": [0.5] * 32}))
    packed = {"model.vision_tower.w.weight": torch.zeros(1, dtype=torch.uint8)}
    save_masks(str(inputs / "masks"), packed, {"model.vision_tower.w.weight": (2, 4)}, {"method": "wanda"})
    shutil.copytree(inputs / "masks", inputs / "corrupt")
    with open(inputs / "corrupt" / "masks.safetensors", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01" if f.read(1) == b"\x00" else b"\x00")
    return inputs


def test_readme_bad_input_list_is_the_tested_list(tiny_llama, data_dir, tmp_path):
    assert _readme_bad_ids() == list(_bad_cases(tiny_llama, data_dir, tmp_path))


@pytest.mark.parametrize("case", _readme_bad_ids())
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tiny_llama, data_dir, tmp_path, bad_inputs, capsys,
                                                            case):
    argv, needle = _bad_cases(tiny_llama, data_dir, bad_inputs)[case]
    if case == "zero_shot_without_lm_eval":
        try:
            import lm_eval  # noqa: F401
            pytest.skip("lm-eval is installed here")
        except ImportError:
            pass
    out = tmp_path / "out"
    if "--save" not in argv and case != "search_without_save":
        argv = [*argv, "--save", str(out / "save")]
    if "--save_model" not in argv:
        argv = [*argv, "--save_model", str(out / "model")]
    before = sorted(os.listdir(bad_inputs))
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and needle in err, err
    assert not out.exists() and sorted(os.listdir(bad_inputs)) == before
