"""main.py end to end on tiny models: outputs, round trips, LLaVA, and every kind of bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_cli
from lib.masks import load_masks
from lib.models import decoder_layers, find_linears, load_model
from lib.prune import check_sparsity

COMMON = ["--nsamples", "4", "--seqlen", "32", "--calib_dataset", "c4"]


def _args(model, data_dir, *extra):
    return ["--model", model, "--data_dir", data_dir, *COMMON, *extra]


def _log_line(folder, method):
    lines = open(os.path.join(folder, f"log_{method}.txt")).read().splitlines()
    assert lines[0] == "method\tactual_sparsity\tppl_test"
    name, sparsity, ppl = lines[1].split("\t")
    return name, float(sparsity), float(ppl)


def test_wanda_run_writes_log_masks_profile_and_reloads(tiny_llama, data_dir, tmp_path, capsys):
    save_dir = tmp_path / "out" / "wanda"
    saved_model = tmp_path / "pruned"
    code, out, err = run_cli(_args(tiny_llama, data_dir, "--prune_method", "wanda", "--sparsity_ratio", "0.5",
                                 "--save", str(save_dir), "--save_model", str(saved_model)), capsys)
    assert code == 0, err
    assert "wikitext perplexity" in out and "sparsity sanity check 0.5000" in out
    name, sparsity, ppl = _log_line(save_dir, "wanda")
    assert name == "wanda" and sparsity == pytest.approx(0.5, abs=1e-4) and ppl > 1
    assert not [f for f in os.listdir(save_dir) if f.endswith(".tmp")]

    manifest = json.load(open(save_dir / "masks.json"))
    assert manifest["method"] == "wanda" and manifest["sparsity_type"] == "unstructured"
    assert len(manifest["modules"]) == 14
    assert all(abs(m["density"] - 0.5) < 1e-6 for m in manifest["modules"].values())
    # One bit per weight, packed.
    numel = sum(torch.Size(m["shape"]).numel() for m in manifest["modules"].values())
    assert os.path.getsize(save_dir / "masks.safetensors") < numel / 8 + 8192

    profile = json.load(open(save_dir / "profile_wanda_unstructured_s0.50.json"))
    assert profile["format"] == "optspa-profile" and profile["sparsity"] == [0.5, 0.5]
    assert profile["method"] == "wanda" and profile["target_sparsity"] == 0.5

    # --save_model: from_pretrained gives the pruned weights back, not the dense ones.
    reloaded = load_model(str(saved_model), dtype="float32")
    assert check_sparsity(reloaded.model)[0] == pytest.approx(0.5, abs=1e-4)
    masks, _ = load_masks(str(save_dir))
    params = dict(reloaded.model.named_parameters())
    for weight_name, mask in masks.items():
        assert ((params[weight_name] == 0) >= mask).all()

    # --masks on the dense model reproduces the pruned model's perplexity without calibration.
    again = tmp_path / "again"
    code, out, err = run_cli(["--model", tiny_llama, "--data_dir", data_dir, "--seqlen", "32",
                              "--masks", str(save_dir), "--save", str(again)], capsys)
    assert code == 0, err
    name2, sparsity2, ppl2 = _log_line(again, "wanda")
    assert sparsity2 == pytest.approx(sparsity) and ppl2 == pytest.approx(ppl, rel=1e-5)
    assert "calibdation" not in out


@pytest.mark.parametrize("method,pattern", [("magnitude", "unstructured"), ("sparsegpt", "2:4"),
                                            ("optspa", "4:8"), ("wanda", "2:4")])
def test_methods_from_the_command_line(tiny_llama, data_dir, tmp_path, capsys, method, pattern):
    extra = ["--sparsity_ratio", "0.5"] if pattern == "unstructured" else []
    code, _, err = run_cli(_args(tiny_llama, data_dir, "--prune_method", method, "--sparsity_type", pattern,
                                 *extra, "--save", str(tmp_path)), capsys)
    assert code == 0, err
    name, sparsity, _ = _log_line(tmp_path, method)
    assert name == method and sparsity == pytest.approx(0.5, abs=1e-3)
    if pattern != "unstructured":
        manifest = json.load(open(tmp_path / "masks.json"))
        assert manifest["sparsity_type"] == pattern


def test_dense_run_evaluates_without_pruning(tiny_llama, data_dir, tmp_path, capsys):
    code, _, err = run_cli(["--model", tiny_llama, "--data_dir", data_dir, "--seqlen", "32",
                            "--eval_datasets", "wikitext2", "c4", "--save", str(tmp_path)], capsys)
    assert code == 0, err
    assert _log_line(tmp_path, "dense")[1] == 0.0
    res = json.load(open(tmp_path / "results_dense.json"))
    assert set(res["ppl"]) == {"wikitext2", "c4"}
    assert not (tmp_path / "masks.json").exists()


def test_llava_prunes_only_language_model(tiny_llava, data_dir, tmp_path, capsys):
    dense = load_model(tiny_llava, dtype="float32").model
    saved_model = tmp_path / "pruned-llava"
    # --search none: uniform Optspa pruning (optspa searches by default), so every row is exactly half zero
    code, _, err = run_cli(_args(tiny_llava, data_dir, "--prune_method", "optspa", "--sparsity_ratio", "0.5",
                                 "--search", "none", "--save", str(tmp_path / "out"), "--save_model",
                                 str(saved_model)), capsys)
    assert code == 0, err
    pruned = load_model(str(saved_model), dtype="float32")
    assert pruned.multimodal
    pruned_params = dict(pruned.model.named_parameters())
    changed = [n for n, p in dense.named_parameters() if not torch.equal(p, pruned_params[n])]
    assert changed and all(".language_model.layers." in n for n in changed)
    for name, p in dense.named_parameters():
        if "vision_tower" in name or "multi_modal_projector" in name:
            assert torch.equal(p, pruned_params[name])
    for layer in decoder_layers(pruned.model):
        for mod in find_linears(layer).values():
            assert ((mod.weight == 0).sum(1) == mod.in_features // 2).all()
    manifest = json.load(open(tmp_path / "out" / "masks.json"))
    assert all(".language_model.layers." in k for k in manifest["modules"])
    # The saved folder keeps the image processor, so it runs with images as it is.
    from transformers import AutoProcessor

    assert type(AutoProcessor.from_pretrained(str(saved_model))).__name__ == "LlavaProcessor"


def test_original_block_profile_reloads_under_the_old_flag_name(tiny_llama, data_dir, tmp_path, capsys):
    prof = tmp_path / "alloc.json"
    prof.write_text(json.dumps({"0": 0.25, "1": 0.75}))
    code, _, err = run_cli(_args(tiny_llama, data_dir, "--prune_method", "wanda", "--sparsity_allocation",
                                 str(prof), "--num_blocks", "2", "--save", str(tmp_path / "o")), capsys)
    assert code == 0, err
    res = json.load(open(tmp_path / "o" / "results_wanda.json"))
    assert res["per_layer_sparsity"] == pytest.approx([0.25, 0.75], abs=0.01)
    saved = json.load(open(tmp_path / "o" / "profile_wanda_unstructured_s0.50.json"))
    assert saved["sparsity"] == [0.25, 0.75]


# ------------------------------------------------------------------------------------------- bad input
BAD = {
    "ratio_above": (["--prune_method", "wanda", "--sparsity_ratio", "1.0"], "outside [0, 1)"),
    "ratio_negative": (["--prune_method", "wanda", "--sparsity_ratio", "-0.1"], "outside [0, 1)"),
    "nm_ratio": (["--prune_method", "wanda", "--sparsity_type", "2:4", "--sparsity_ratio", "0.6"], "2:4"),
    "nm_bad": (["--prune_method", "wanda", "--sparsity_type", "5:4"], "need 0 < N < M"),
    "method": (["--prune_method", "pruneall", "--sparsity_ratio", "0.5"], "invalid choice"),
    "variant_nm": (["--prune_method", "wanda", "--use_variant", "--sparsity_type", "2:4"], "unstructured"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_flags_give_one_line_and_exit_2(tiny_llama, data_dir, tmp_path, capsys, case):
    extra, needle = BAD[case]
    save = tmp_path / "never"
    code, out, err = run_cli(_args(tiny_llama, data_dir, *extra, "--save", str(save)), capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert not save.exists()


def test_model_that_cannot_be_loaded_offline(data_dir, tmp_path, capsys):
    save = tmp_path / "never"
    code, _, err = run_cli(["--model", "no-such-org/no-such-model", "--prune_method", "wanda", "--sparsity_ratio",
                            "0.5", "--data_dir", data_dir, "--save", str(save)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "cannot load model" in err and "no-such-org/no-such-model" in err
    assert not save.exists()


def test_missing_dataset_without_data_dir(tiny_llama, tmp_path, capsys):
    save = tmp_path / "never"
    code, _, err = run_cli(["--model", tiny_llama, "--prune_method", "wanda", "--sparsity_ratio", "0.5",
                            "--nsamples", "2", "--seqlen", "32", "--save", str(save)], capsys)
    assert code == 2 and "--data_dir" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not save.exists()


def test_missing_files_in_data_dir(tiny_llama, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(_args(tiny_llama, str(empty), "--prune_method", "wanda", "--sparsity_ratio", "0.5"),
                           capsys)
    assert code == 2 and "c4 train shard not found" in err


def test_unwritable_save(tiny_llama, data_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(_args(tiny_llama, data_dir, "--prune_method", "magnitude", "--sparsity_ratio", "0.5",
                                 "--save", str(blocker / "sub")), capsys)
    assert code == 2 and "--save" in err and len(err.strip().splitlines()) == 1


def test_masks_that_do_not_fit_the_model(tiny_llama, tiny_llava, data_dir, tmp_path, capsys):
    out = tmp_path / "llama-masks"
    code, _, err = run_cli(_args(tiny_llama, data_dir, "--prune_method", "magnitude", "--sparsity_ratio", "0.5",
                                 "--save", str(out)), capsys)
    assert code == 0, err
    save = tmp_path / "never"
    code, _, err = run_cli(["--model", tiny_llava, "--data_dir", data_dir, "--seqlen", "32", "--masks", str(out),
                            "--save", str(save)], capsys)
    assert code == 2 and "matches no prunable weight" in err and len(err.strip().splitlines()) == 1
    assert not save.exists()
    # A corrupted mask file is caught by the manifest checksum.
    with open(out / "masks.safetensors", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    code, _, err = run_cli(["--model", tiny_llama, "--data_dir", data_dir, "--seqlen", "32", "--masks", str(out)],
                           capsys)
    assert code == 2 and "checksum" in err


def test_profile_that_does_not_fit(tiny_llama, data_dir, tmp_path, capsys):
    prof = tmp_path / "p.json"
    prof.write_text(json.dumps({"format": "optspa-profile", "version": 1, "num_layers": 32,
                                "sparsity": [0.5] * 32}))
    code, _, err = run_cli(_args(tiny_llama, data_dir, "--prune_method", "wanda", "--sparsity_profile", str(prof)),
                           capsys)
    assert code == 2 and "32 decoder layers" in err


def test_bad_input_has_no_traceback_in_a_real_process(tmp_path):
    """The same checks through a real interpreter: one stderr line, status 2, nothing written."""
    save = tmp_path / "never"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--model", str(tmp_path / "nope"),
                           "--prune_method", "wanda", "--sparsity_ratio", "0.5", "--save", str(save)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not save.exists()


# ------------------------------------------------------------------------------------------- KV cache
def test_kv_bits_on_a_pruned_model_logs_ppl_and_kv_bytes(tiny_llama, data_dir, tmp_path, capsys):
    code, out, err = run_cli(_args(tiny_llama, data_dir, "--prune_method", "wanda", "--sparsity_ratio", "0.5",
                                   "--kv_bits", "8", "--kv_group_size", "16", "--save", str(tmp_path)), capsys)
    assert code == 0, err
    lines = open(tmp_path / "log_wanda.txt").read().splitlines()
    assert lines[0] == "method\tactual_sparsity\tppl_test\tkv_bytes_per_token\tkv_ratio_fp16"
    _, _, ppl, kv_bytes, ratio = lines[1].split("\t")
    assert 0.5 < float(ratio) < 0.6 and float(kv_bytes) > 0
    assert "bytes per token" in out
    res = json.load(open(tmp_path / "results_wanda.json"))
    assert res["kv"]["key_bits"] == [8, 8]
    saved = [f for f in os.listdir(tmp_path) if f.startswith("profile") and f.endswith(".json")]
    assert saved and json.load(open(tmp_path / saved[0]))["kv_bits"] == {"key": [8, 8], "value": [8, 8]}
    # The saved profile reloads as --kv_profile and gives the same perplexity.
    code, out, err = run_cli(_args(tiny_llama, data_dir, "--prune_method", "wanda", "--sparsity_ratio", "0.5",
                                   "--kv_profile", str(tmp_path / saved[0]), "--kv_group_size", "16",
                                   "--save", str(tmp_path / "again")), capsys)
    assert code == 0, err
    assert open(tmp_path / "again" / "log_wanda.txt").read().splitlines()[1].split("\t")[2] == ppl


@pytest.mark.parametrize("extra,needle", [
    (["--kv_bits", "7"], "invalid choice"),
    (["--kv_bits", "8"], "divide head_dim"),  # default group 32 vs head_dim 16
    (["--kv_profile", "8x3", "--kv_group_size", "16"], "3 layers"),
    (["--kv_bits", "8", "--kv_profile", "8x2", "--kv_group_size", "16"], "not both"),
])
def test_bad_kv_input(tiny_llama, data_dir, tmp_path, capsys, extra, needle):
    save = tmp_path / "never"
    code, _, err = run_cli(["--model", tiny_llama, "--data_dir", data_dir, "--seqlen", "32", *extra,
                            "--save", str(save)], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not save.exists()
