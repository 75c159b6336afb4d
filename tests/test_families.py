"""Other LLaMA-style families and LLaVA-NeXT load through the same path and prune the same way."""
import sys

import pytest
import torch

from conftest import run_cli, tiny_llama_config
from lib.models import decoder_layers, find_linears, load_model, pruned_weight_names
from lib.profile import Profile
from lib.prune import prune_optspa, prune_wanda
from lib.sparsity import SparsityType


def _save(model, tmp_path, name):
    folder = tmp_path / name
    model.save_pretrained(folder)
    return str(folder)


def _copy_tokenizer(src: str, dst: str) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(src).save_pretrained(dst)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_mistral_and_qwen2_prune_with_exact_row_sparsity(tiny_llama, tmp_path, family):
    import transformers

    base = tiny_llama_config(200).to_dict()
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size", "max_position_embeddings")
    kw = {k: base[k] for k in keep}
    if family == "mistral":
        cfg, cls = transformers.MistralConfig(sliding_window=16, **kw), transformers.MistralForCausalLM
    else:
        cfg, cls = transformers.Qwen2Config(**kw), transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    folder = _save(cls(cfg), tmp_path, family)
    _copy_tokenizer(tiny_llama, folder)
    lm = load_model(folder, dtype="float32")
    calib = [torch.randint(5, 200, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    prune_wanda(lm.model, calib, Profile.uniform(2, 0.5), SparsityType())
    for layer in decoder_layers(lm.model):
        for mod in find_linears(layer).values():
            assert ((mod.weight == 0).sum(1) == mod.in_features // 2).all()


def test_llava_next_prunes_language_model_only(tiny_llama, tmp_path):
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    cfg = LlavaNextConfig(vision_config=vision, text_config=tiny_llama_config(200), image_token_index=4,
                          image_grid_pinpoints=[[32, 32], [32, 64]])
    torch.manual_seed(0)
    dense = LlavaNextForConditionalGeneration(cfg)
    folder = _save(dense, tmp_path, "llava-next")
    _copy_tokenizer(tiny_llama, folder)
    lm = load_model(folder, dtype="float32")
    assert lm.multimodal and type(lm.model).__name__ == "LlavaNextForConditionalGeneration"
    assert all(".language_model.layers." in n for n in pruned_weight_names(lm.model))
    before = {n: p.clone() for n, p in lm.model.named_parameters()}
    calib = [torch.randint(5, 200, (1, 16))]
    prune_optspa(lm.model, calib, Profile.uniform(2, 0.5), SparsityType(2, 4))
    changed = {n for n, p in lm.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(pruned_weight_names(lm.model))


def test_original_llava_checkpoint_loads_without_the_package(tiny_llama, data_dir, tmp_path, capsys, monkeypatch):
    """An original LLaVA config (liuhaotian/*) loads its language model natively (tests/test_llava_original.py
    covers the full layout); the LLaVA package is not needed."""
    import json
    import shutil

    folder = tmp_path / "liuhaotian-style"
    shutil.copytree(tiny_llama, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["LlavaLlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setitem(sys.modules, "llava", None)  # as if the package is not installed
    monkeypatch.setitem(sys.modules, "llava.model", None)
    code, out, err = run_cli(["--model", str(folder), "--prune_method", "magnitude", "--sparsity_ratio", "0.5",
                              "--data_dir", data_dir, "--seqlen", "16"], capsys)
    assert code == 0, err
    assert "original LLaVA checkpoint (LlavaLlamaForCausalLM)" in out


def test_zero_shot_without_lm_eval_is_a_one_line_error(tiny_llama, data_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    code, _, err = run_cli(["--model", tiny_llama, "--data_dir", data_dir, "--eval_zero_shot"], capsys)
    assert code == 2 and "pip install lm-eval" in err and len(err.strip().splitlines()) == 1
