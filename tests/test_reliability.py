"""Issue 10: every output tells the truth and nothing breaks on a GPU node. Each test here failed before its fix.

The offload path is tested on the CPU by running it for real (``offload=True`` / ``--offload on`` take the
layer-at-a-time path on any device; on the CPU the moves are no-ops but capture, per-batch arguments and
layer-by-layer execution all run) and comparing with the plain path. What only a GPU can show (layers really
leave and return to the CPU, float16 compute) is in the CUDA tests at the end, skipped here with the reason.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import run_cli
from lib.eval import eval_ppl
from lib.io import check_writable_dir
from lib.masks import load_masks
from lib.models import (DeviceMemoryError, calib_buffer_bytes, decoder_layers, load_model, param_bytes,
                        place_model, should_offload)
from lib.offload import module_device, on_device
from lib.profile import ProfileError, load_profile
from lib.profile import Profile
from lib.prune import prune_wanda
from lib.sparsity import SparsityType

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine: the GPU offload/fp16 tests "
                                                 "run only where torch.cuda.is_available()")
COMMON = ["--nsamples", "4", "--seqlen", "32", "--calib_dataset", "c4"]


def _args(model, data_dir, *extra):
    return ["--model", model, "--data_dir", data_dir, *COMMON, *extra]


def _one_line_exit_2(code, err, save=None):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    if save is not None:
        assert not os.path.exists(save)


# ------------------------------------------------------------------------- 5: offload with a short last batch
def test_offloaded_eval_handles_a_short_last_batch(tiny_llama, data_dir):
    from lib.data import get_eval_tokens

    lm = load_model(tiny_llama, dtype="float32")
    ids = get_eval_tokens("wikitext2", lm.tokenizer, data_dir, "test", 32)[:, : 5 * 32]  # 5 windows: 2 + 2 + 1
    plain = eval_ppl(lm.model, ids, 32, batch_size=2)
    assert eval_ppl(lm.model, ids, 32, batch_size=2, offload=True) == pytest.approx(plain, rel=1e-5)
    assert eval_ppl(lm.model, ids, 32, batch_size=1, offload=True) == pytest.approx(plain, rel=1e-5)


def test_cli_offload_on_with_eval_batch_size_2(tiny_llama, data_dir, tmp_path, capsys):
    """--offload on reaches the layer-at-a-time path on the CPU too, and agrees with --offload off."""
    ppl = {}
    for mode in ("off", "on"):
        save = tmp_path / mode
        code, out, err = run_cli(_args(tiny_llama, data_dir, "--prune_method", "wanda", "--sparsity_ratio", "0.5",
                                       "--offload", mode, "--eval_batch_size", "2", "--save", str(save)), capsys)
        assert code == 0, err
        assert f"offload {mode == 'on'}" in out
        ppl[mode] = json.load(open(save / "results_wanda.json"))["ppl"]["wikitext2"]
    assert ppl["on"] == pytest.approx(ppl["off"], rel=1e-5)
    on, _ = load_masks(str(tmp_path / "on"))
    off, _ = load_masks(str(tmp_path / "off"))
    assert all(torch.equal(on[k], off[k]) for k in off)


# ------------------------------------------------------------------------- 6: unwritable folders, as root too
@pytest.mark.parametrize("flag", ["--save", "--save_model"])
def test_unwritable_output_is_found_before_loading(tiny_llama, data_dir, capsys, flag):
    # /proc accepts no new files even for root, whom os.access lets through everywhere.
    assert check_writable_dir("/proc/optspa-never") is not None
    code, out, err = run_cli(_args(tiny_llama, data_dir, "--prune_method", "magnitude", "--sparsity_ratio", "0.5",
                                   flag, "/proc/optspa-never/out"), capsys)
    _one_line_exit_2(code, err, "/proc/optspa-never")
    assert flag in err and "loading llm model" not in out


def test_writable_probe_leaves_nothing_behind(tmp_path):
    assert check_writable_dir(str(tmp_path / "a" / "b")) is None
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------- 7: offload decision counts buffers
def test_offload_decision_counts_calibration_buffers(tiny_llama):
    lm = load_model(tiny_llama, dtype="float32")
    weights = param_bytes(lm.model)
    buffers = calib_buffer_bytes(128, 64, 64, torch.float32)
    assert buffers == 2 * 128 * 64 * 64 * 4
    free = int(weights / 0.7) + 1  # the weights alone just fit in the 70% the decision allows
    assert not should_offload(lm.model, "cuda", "auto", buffer_bytes=0, free_bytes=free)
    # ... but not with the buffers, while one layer plus the buffers still does: offload.
    assert should_offload(lm.model, "cuda", "auto", buffer_bytes=free // 10, free_bytes=free)
    assert not should_offload(lm.model, "cuda", "off", buffer_bytes=free // 10, free_bytes=free)


def test_offload_fails_in_one_line_when_one_layer_and_buffers_do_not_fit(tiny_llama):
    lm = load_model(tiny_llama, dtype="float32")
    layer = param_bytes(decoder_layers(lm.model)[0])
    resident = param_bytes(lm.model) - param_bytes(decoder_layers(lm.model))
    with pytest.raises(DeviceMemoryError, match="calibration buffers") as info:
        should_offload(lm.model, "cuda", "auto", buffer_bytes=10 * layer, free_bytes=resident + 2 * layer)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------- 8: original profile files
def test_original_fine_profile_as_python_literal(tiny_llama, data_dir, tmp_path, capsys):
    mods = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj"]
    ratios = {f"{i}-{m}": (0.47500000000000003 if i == 0 else 0.525) for i in range(2) for m in mods}
    prof = tmp_path / "fine.txt"
    prof.write_text(repr(ratios))  # what the original tool wrote: str(dict)
    assert "'0-self_attn.q_proj': 0.47500000000000003" in prof.read_text()
    p = load_profile(str(prof), num_layers=2)
    assert p.ratio(0, "mlp.up_proj") == 0.47500000000000003 and p.ratio(1, "self_attn.q_proj") == 0.525
    code, _, err = run_cli(_args(tiny_llama, data_dir, "--prune_method", "wanda", "--sparsity_profile", str(prof),
                                 "--save", str(tmp_path / "o")), capsys)
    assert code == 0, err
    res = json.load(open(tmp_path / "o" / "results_wanda.json"))
    assert res["per_layer_sparsity"] == pytest.approx([0.475, 0.525], abs=0.01)


@pytest.mark.parametrize("text,needle", [
    ("__import__('os').system('touch {marker}')", "not valid JSON"),  # code, never run
    ("[0.5, 0.5]", "not a JSON object"),
    ("{'0': 'half'}", "neither an optspa-profile"),
    ("{'0': True, '1': 0.5}", "neither an optspa-profile"),
    ("{(0, 1): 0.5}", "keys"),
    ("", "not valid JSON"),
])
def test_bad_profile_text_is_one_line(tmp_path, text, needle):
    marker = tmp_path / "executed"
    prof = tmp_path / "p.txt"
    prof.write_text(text.replace("{marker}", str(marker)))
    with pytest.raises(ProfileError, match=needle) as info:
        load_profile(str(prof), num_layers=2)
    assert "\n" not in str(info.value) and not marker.exists()


def test_binary_profile_is_one_line(tmp_path):
    prof = tmp_path / "p.bin"
    prof.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ProfileError, match="not a text file"):
        load_profile(str(prof), num_layers=2)


# ------------------------------------------------------------------------- 9: the offload context manager
def test_on_device_runs_in_place_without_offload_and_restores_on_error(tiny_llama):
    lm = load_model(tiny_llama, dtype="float32")
    layer = decoder_layers(lm.model)[0]
    before = {n: p.data_ptr() for n, p in layer.named_parameters()}
    with on_device(layer, "cpu", offload=False) as same:
        assert same is layer
    with pytest.raises(RuntimeError, match="boom"):
        with on_device(layer, "cpu", offload=True):
            raise RuntimeError("boom")
    assert module_device(layer).type == "cpu"
    assert {n: p.data_ptr() for n, p in layer.named_parameters()} == before  # CPU to CPU copies nothing


@needs_cuda
def test_cuda_on_device_moves_the_layer_and_parks_it_back(tiny_llama):
    lm = load_model(tiny_llama, dtype="float32")
    layer = decoder_layers(lm.model)[1]
    ref = {n: p.detach().clone() for n, p in layer.named_parameters()}
    with on_device(layer, "cuda", offload=True):
        assert all(p.device.type == "cuda" for p in layer.parameters())
        with torch.no_grad():
            layer.mlp.up_proj.weight[0, 0] = 0.0
    assert all(p.device.type == "cpu" for p in layer.parameters())
    assert layer.mlp.up_proj.weight[0, 0] == 0 and torch.equal(layer.self_attn.q_proj.weight,
                                                                ref["self_attn.q_proj.weight"])
    with pytest.raises(RuntimeError):
        with on_device(layer, "cuda", offload=True):
            raise RuntimeError("step failed")
    assert all(p.device.type == "cpu" for p in layer.parameters())


@needs_cuda
def test_cuda_offloaded_pruning_and_eval_match_the_resident_model(tiny_llama, data_dir):
    from lib.data import get_calibration, get_eval_tokens

    results = {}
    for offload in (False, True):
        lm = load_model(tiny_llama, dtype="float32", device="cuda")
        place_model(lm.model, "cuda", offload)
        calib = get_calibration("c4", lm.tokenizer, 4, 0, 32, data_dir)
        res = prune_wanda(lm.model, calib, Profile.uniform(2, 0.5), SparsityType(), device="cuda", offload=offload)
        layer_devices = {p.device.type for p in decoder_layers(lm.model).parameters()}
        assert layer_devices == ({"cpu"} if offload else {"cuda"})
        assert lm.model.get_output_embeddings().weight.device.type == "cuda"
        ids = get_eval_tokens("wikitext2", lm.tokenizer, data_dir, "test", 32)[:, : 5 * 32]
        results[offload] = (res.masks, eval_ppl(lm.model, ids, 32, "cuda", batch_size=2, offload=offload))
    (m0, p0), (m1, p1) = results[False], results[True]
    assert p1 == pytest.approx(p0, rel=1e-4)
    agree = sum(int((a == b).sum()) for a, b in ((m0[k], m1[k]) for k in m0)) / sum(v.numel() for v in m0.values())
    assert agree > 0.99  # same masks up to float ties between two kernels


@needs_cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_half_precision_cli_run(tiny_llama, data_dir, tmp_path, capsys, dtype):
    save, saved_model = tmp_path / "o", tmp_path / "m"
    code, out, err = run_cli(_args(tiny_llama, data_dir, "--device", "cuda", "--dtype", dtype, "--offload", "on",
                                   "--prune_method", "sparsegpt", "--sparsity_type", "2:4", "--eval_batch_size", "2",
                                   "--save", str(save), "--save_model", str(saved_model)), capsys)
    assert code == 0, err
    res = json.load(open(save / f"results_sparsegpt.json"))
    assert res["actual_sparsity"] == pytest.approx(0.5, abs=1e-3) and res["ppl"]["wikitext2"] < 1e4
    cfg = json.load(open(saved_model / "config.json"))
    assert cfg.get("dtype", cfg.get("torch_dtype")) == dtype
