"""VQA-style evaluation of the in-memory model through the real lmms-eval evaluator (a local task: YAML over a
JSONL and images), no mocks. Skipped when lmms-eval is not installed (it is optional; INSTALL.md)."""
import json
import sys

import pytest
import torch

from lib import lmms_adapter
from lib.models import decoder_layers, load_model
from lib.models import load_processor as _load_processor
from lib.profile import Profile
from lib.prune import prune_magnitude
from lib.sparsity import SparsityType


def _images(folder, n=3):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    names = []
    for i in range(n):
        arr = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"im{i}.png")
        names.append(f"im{i}.png")
    return names


def _greedy(model, proc, image, question, max_new_tokens=16):  # the task YAML says 16
    from PIL import Image

    text = lmms_adapter.prompt(question + "\nAnswer the question using a single word or phrase.", 1, system="")
    enc = proc(images=Image.open(image).convert("RGB"), text=text, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=proc.tokenizer.pad_token_id)
    return proc.tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).split("ASSISTANT:")[0]


def test_lmms_eval_scores_the_pruned_model_in_memory(tiny_llava, tmp_path):
    pytest.importorskip("lmms_eval.evaluator", reason="lmms-eval is optional (pip install lmms-eval; INSTALL.md)")
    lm = load_model(tiny_llava, dtype="float32")
    proc = _load_processor(tiny_llava)
    proc.num_additional_image_tokens = 1  # the fixture's processor must count the CLS position the model drops
    names = _images(tmp_path)
    questions = ["the cat", "a mat", "layer decoder", "keys values"]
    rows = [(names[i % 3], q) for i, q in enumerate(questions)]
    dense = [_greedy(lm.model, proc, tmp_path / im, q) for im, q in rows]
    prune_magnitude(lm.model, Profile.uniform(len(decoder_layers(lm.model)), 0.7), SparsityType())
    pruned = [_greedy(lm.model, proc, tmp_path / im, q) for im, q in rows]
    assert dense != pruned  # so scoring against the pruned answers tells which model was evaluated
    # rows 0 and 1: four references equal to the pruned model's answer (VQA accuracy 1); rows 2, 3: never said
    jsonl = tmp_path / "vqa.jsonl"
    with open(jsonl, "w") as f:
        for i, ((im, q), ans) in enumerate(zip(rows, pruned)):
            refs = [ans] * 4 if i < 2 else ["zzqx unlikely answer"]
            f.write(json.dumps({"image": im, "question": q, "answers": refs}) + "\n")
    task = lmms_adapter.write_vqa_task(str(jsonl), str(tmp_path), str(tmp_path / "task"), name="tiny_vqa")
    res = lmms_adapter.evaluate(lm.model, proc, ["tiny_vqa"], include_path=task, max_new_tokens=8, system="")
    assert res["tiny_vqa"]["vqa_accuracy"] == pytest.approx(0.5)
    assert res["tiny_vqa"]["exact_match"] == pytest.approx(0.5)


def test_unknown_task_and_missing_package(tiny_llava, monkeypatch):
    pytest.importorskip("lmms_eval.evaluator", reason="lmms-eval is optional")
    lm = load_model(tiny_llava, dtype="float32")
    with pytest.raises(ValueError, match="unknown lmms-eval task"):
        lmms_adapter.evaluate(lm.model, _load_processor(tiny_llava), ["no_such_task_xyz"])
    monkeypatch.setitem(sys.modules, "lmms_eval.evaluator", None)
    with pytest.raises(lmms_adapter.LmmsUnavailable, match="pip install lmms-eval"):
        lmms_adapter.require_lmms()


def test_cli_eval_lmms_writes_results_and_one_line_per_task(tiny_llava, data_dir, tmp_path, capsys):
    pytest.importorskip("lmms_eval.evaluator", reason="lmms-eval is optional")
    import shutil

    from conftest import run_cli

    folder = tmp_path / "llava"
    shutil.copytree(tiny_llava, folder)
    proc = _load_processor(tiny_llava)
    proc.num_additional_image_tokens = 1
    proc.save_pretrained(str(folder))
    names = _images(tmp_path)
    jsonl = tmp_path / "vqa.jsonl"
    jsonl.write_text("".join(json.dumps({"image": n, "question": "the cat", "answers": ["zzqx"]}) + "\n"
                             for n in names))
    task = lmms_adapter.write_vqa_task(str(jsonl), str(tmp_path), str(tmp_path / "task"), name="tiny_vqa_cli")
    out = tmp_path / "out"
    code, log, err = run_cli(["--model", str(folder), "--data_dir", data_dir, "--seqlen", "64",
                              "--eval_lmms", "tiny_vqa_cli", "--lmms_include", task, "--save", str(out),
                              "--kv_bits", "8", "--kv_group_size", "16"], capsys)
    assert code == 0, err
    assert sum("lmms-eval tiny_vqa_cli:" in line for line in log.splitlines()) == 1
    res = json.load(open(out / "results_dense.json"))
    assert res["lmms"]["tiny_vqa_cli"]["vqa_accuracy"] == 0.0 and res["kv"] is not None
    code, _, err = run_cli(["--model", str(folder), "--eval_lmms", "no_such_task_xyz"], capsys)
    assert code == 2 and "unknown lmms-eval task" in err and len(err.strip().splitlines()) == 1


def test_cli_eval_lmms_on_an_original_checkpoint(data_dir, tmp_path, capsys):
    """An original LLaVA checkpoint: --eval_lmms builds the multimodal model around the pruned language model
    (vision tower from --vision_tower) and lmms-eval scores it in memory."""
    pytest.importorskip("lmms_eval.evaluator", reason="lmms-eval is optional")
    from conftest import run_cli
    from test_llava_original import build_original

    _, ckpt, vision_dir = build_original(str(tmp_path))
    names = _images(tmp_path)
    jsonl = tmp_path / "vqa.jsonl"
    jsonl.write_text("".join(json.dumps({"image": n, "question": "what", "answers": ["zzqx"]}) + "\n" for n in names))
    task = lmms_adapter.write_vqa_task(str(jsonl), str(tmp_path), str(tmp_path / "task"), name="orig_vqa_cli")
    out = tmp_path / "out"
    code, log, err = run_cli(["--model", ckpt, "--vision_tower", vision_dir, "--data_dir", data_dir,
                              "--seqlen", "64", "--prune_method", "magnitude", "--sparsity_ratio", "0.5",
                              "--eval_lmms", "orig_vqa_cli", "--lmms_include", task, "--save", str(out)], capsys)
    assert code == 0, err
    res = json.load(open(out / "results_magnitude.json"))
    assert set(res["lmms"]["orig_vqa_cli"]) >= {"vqa_accuracy", "exact_match"}
    assert res["actual_sparsity"] == pytest.approx(0.5, abs=0.01)
