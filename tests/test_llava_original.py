"""Original LLaVA checkpoints (liuhaotian/* layout) without the LLaVA package.

Each test builds a reference transformers Llava(Next)ForConditionalGeneration from configs, writes the same
weights out in the original release's layout (language model under model.* / lm_head, projector under
model.mm_projector.{0,2}, image_newline, LLaVA's config keys, the CLIP tower in its own folder, a tokenizer
without <image>), and loads that folder through the real loading path.
"""
import json
import os
import random

import pytest
import torch

from conftest import WORDS, run_cli, tiny_llama_config
from lib import llava_original
from lib.models import decoder_layers, find_linears, load_model, pruned_weight_names
from lib.profile import Profile
from lib.prune import prune_wanda
from lib.sparsity import SparsityType

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8, projection_dim=32)
PINPOINTS = [[32, 32], [32, 64], [64, 32]]


def _plain_tokenizer(folder: str):
    """A LLaMA-like tokenizer without <image> (the original release adds it at run time)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(200)], trainer)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def build_original(root, next_: bool = False, weights: str = "safetensors", shards: int = 2):
    """(reference model, checkpoint folder, vision folder). The reference's vocabulary has one row more than
    the checkpoint: the <image> token the loader adds (its row is never read)."""
    import transformers
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    ckpt, vision_dir = os.path.join(root, "llava-orig"), os.path.join(root, "clip-tower")
    os.makedirs(ckpt)
    tok = _plain_tokenizer(ckpt)
    vocab = len(tok)
    text = tiny_llama_config(vocab + 1, pad_token_id=None)
    vcfg = CLIPVisionConfig(**VISION)
    common = dict(vision_config=vcfg, text_config=text, image_token_index=vocab, vision_feature_layer=-2,
                  vision_feature_select_strategy="default")
    torch.manual_seed(0)
    if next_:
        ref = transformers.LlavaNextForConditionalGeneration(
            transformers.LlavaNextConfig(image_grid_pinpoints=PINPOINTS, **common))
    else:
        ref = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**common))
    with torch.no_grad():  # a visible image newline and non-trivial projector biases
        for n, p in ref.named_parameters():
            if "image_newline" in n or "multi_modal_projector" in n:
                p.normal_(0, 0.5)
    ref.eval()
    ref.model.vision_tower.save_pretrained(vision_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(vision_dir)
    sd = {}
    for n, p in ref.state_dict().items():
        if n.startswith("model.vision_tower."):
            continue
        k = (n.replace("model.language_model.", "model.")
             .replace("model.multi_modal_projector.linear_1", "model.mm_projector.0")
             .replace("model.multi_modal_projector.linear_2", "model.mm_projector.2"))
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            p = p[:vocab]
        sd[k] = p.detach().clone().contiguous()
    keys = sorted(sd)
    index = {}
    for s in range(shards):
        part = {k: sd[k] for k in keys[s::shards]}
        fname = (f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if weights == "safetensors"
                 else f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin")
        if weights == "safetensors":
            from safetensors.torch import save_file

            save_file(part, os.path.join(ckpt, fname), metadata={"format": "pt"})
        else:
            torch.save(part, os.path.join(ckpt, fname))
        index.update({k: fname for k in part})
    idx_name = "model.safetensors.index.json" if weights == "safetensors" else "pytorch_model.bin.index.json"
    with open(os.path.join(ckpt, idx_name), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)
    cfg = tiny_llama_config(vocab).to_dict()
    for k in ("architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path"):
        cfg.pop(k, None)
    cfg.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava",
               mm_vision_tower="openai/clip-vit-large-patch14-336", mm_hidden_size=VISION["hidden_size"],
               mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
               mm_use_im_start_end=False, mm_use_im_patch_token=False, tune_mm_mlp_adapter=False,
               image_aspect_ratio="anyres" if next_ else "pad", tokenizer_model_max_length=64,
               tokenizer_padding_side="right", use_cache=True)
    if next_:
        cfg.update(image_grid_pinpoints=PINPOINTS, mm_patch_merge_type="spatial_unpad")
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return ref, ckpt, vision_dir


def _image(w=48, h=32, seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.fixture
def orig15(tmp_path):
    return build_original(str(tmp_path))


def test_language_model_loads_as_is_without_the_vision_tower(orig15):
    ref, ckpt, _ = orig15
    lm = load_model(ckpt, dtype="float32")
    assert type(lm.model).__name__ == "LlamaForCausalLM" and not lm.multimodal
    assert lm.original_llava is not None and lm.original_llava.vision_tower == "openai/clip-vit-large-patch14-336"
    ids = torch.randint(5, lm.original_llava.text_vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = lm.model(input_ids=ids).logits
        want = ref(input_ids=ids).logits[..., : got.shape[-1]]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(n.startswith("model.layers.") for n in pruned_weight_names(lm.model))


@pytest.mark.parametrize("next_", [False, True], ids=["llava-1.5", "llava-1.6"])
def test_multimodal_logits_equal_transformers_classes(tmp_path, next_):
    ref, ckpt, vision_dir = build_original(str(tmp_path), next_=next_, weights="bin" if next_ else "safetensors")
    lm = load_model(ckpt, dtype="float32")
    mm, processor = llava_original.build_multimodal(lm.model, lm.tokenizer, lm.original_llava, vision_tower=vision_dir)
    assert type(mm).__name__ == type(ref).__name__
    assert mm.config.image_token_index == ref.config.image_token_index
    assert mm.model.language_model is lm.model.model  # shared: pruning one prunes the other
    inputs = processor(images=_image(), text="a cat <image>\nwhat is on the mat", return_tensors="pt")
    assert (inputs["input_ids"] == mm.config.image_token_index).sum() > 1  # expanded to one id per image token
    with torch.no_grad():
        got = mm(**inputs).logits
        want = ref(**inputs).logits
    vocab = lm.original_llava.text_vocab_size
    torch.testing.assert_close(got[..., :vocab], want[..., :vocab], rtol=1e-5, atol=1e-5)
    if not next_:  # LLaVA-1.5's "pad": expand2square with the image mean as background, then CLIP's resize/crop
        from PIL import Image
        from transformers import CLIPImageProcessor

        img = _image()
        clip = CLIPImageProcessor.from_pretrained(vision_dir)
        square = Image.new(img.mode, (48, 48), tuple(int(x * 255) for x in clip.image_mean))
        square.paste(img, (0, (48 - 32) // 2))
        want_pixels = clip(images=square, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(inputs["pixel_values"], want_pixels, rtol=0, atol=0.02)


def test_vision_tower_flag_is_required_offline(orig15):
    _, ckpt, _ = orig15
    lm = load_model(ckpt, dtype="float32")
    with pytest.raises(llava_original.OriginalLlavaError, match="--vision_tower"):
        llava_original.build_multimodal(lm.model, lm.tokenizer, lm.original_llava)


def test_pruning_touches_decoder_linears_only_and_saves_original_keys(tmp_path):
    ref, ckpt, vision_dir = build_original(str(tmp_path))
    lm = load_model(ckpt, dtype="float32")
    mm, processor = llava_original.build_multimodal(lm.model, lm.tokenizer, lm.original_llava, vision_tower=vision_dir)
    before = {n: p.clone() for n, p in mm.named_parameters()}
    inputs = processor(images=_image(), text="<image>\nthe cat sat on a mat", return_tensors="pt")
    calib = [inputs["input_ids"][:, :16]]
    prune_wanda(mm, calib, Profile.uniform(2, 0.5), SparsityType())
    changed = {n for n, p in mm.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(pruned_weight_names(mm))
    out = str(tmp_path / "saved")
    replaced = llava_original.save_original(mm, lm.original_llava, out)
    assert sorted(os.listdir(out)) == sorted(os.listdir(ckpt))
    with open(os.path.join(out, "config.json")) as a, open(os.path.join(ckpt, "config.json")) as b:
        assert json.load(a) == json.load(b)
    from safetensors.torch import load_file

    orig = {k: v for f in os.listdir(ckpt) if f.endswith(".safetensors") for k, v in load_file(f"{ckpt}/{f}").items()}
    new = {k: v for f in os.listdir(out) if f.endswith(".safetensors") for k, v in load_file(f"{out}/{f}").items()}
    assert new.keys() == orig.keys() and any(k.startswith("model.mm_projector.") for k in new)
    assert set(replaced) == {k for k in orig if k.startswith("model.layers.")}
    for k in orig:
        if k.startswith("model.layers.") and "proj" in k:
            assert (new[k] == 0).float().mean() == pytest.approx(0.5)
        else:
            assert torch.equal(new[k], orig[k]), k  # projector, embeddings (original rows), norms untouched
    # the saved folder loads again, with the same zeros
    again = load_model(out, dtype="float32")
    for layer_a, layer_b in zip(decoder_layers(again.model), decoder_layers(mm)):
        for name, m in find_linears(layer_a).items():
            assert torch.equal(m.weight, find_linears(layer_b)[name].weight)


def test_cli_prunes_and_saves_an_original_checkpoint(orig15, data_dir, tmp_path, capsys):
    _, ckpt, _ = orig15
    out = str(tmp_path / "pruned")
    code, _, err = run_cli(["--model", ckpt, "--data_dir", data_dir, "--prune_method", "wanda",
                            "--sparsity_ratio", "0.5", "--nsamples", "2", "--seqlen", "16", "--save_model", out,
                            "--device", "cpu"], capsys)
    assert code == 0, err
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == ["LlavaLlamaForCausalLM"]
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_cache_with_image_tokens_equals_simulation(tmp_path, bits):
    """LLaVA-1.6 (anyres: base image + tiles + newline tokens) from an original checkpoint: greedy generation
    with the real packed cache equals generation under the simulation hooks; bytes per token are measured."""
    from lib.kvquant import KVQuantConfig, fp16_kv_bytes_per_token
    from lib.mmkv import image_prompt_kv

    _, ckpt, vision_dir = build_original(str(tmp_path), next_=True)
    lm = load_model(ckpt, dtype="float32")
    mm, processor = llava_original.build_multimodal(lm.model, lm.tokenizer, lm.original_llava, vision_tower=vision_dir)
    cfg = KVQuantConfig.uniform(bits, 2, group_size=8, token_group_size=8, residual=4)
    rep = image_prompt_kv(mm, processor, _image(64, 32), "<image>\nthe cat sat on a", cfg, max_new_tokens=6)
    assert rep["real_equals_simulation"]
    assert rep["image_tokens"] > 16 and rep["cached_tokens"] == rep["prompt_tokens"] + 5
    fp16 = fp16_kv_bytes_per_token(2, 2, 16)
    assert rep["fp16_bytes_per_token"] == fp16
    # stored bytes: the configured rate for the quantized tokens, more for the full-precision residual window
    assert rep["kv_bytes_per_token_configured"] < rep["kv_bytes_per_token_measured"] < fp16


def test_cli_original_checkpoint_with_image_calibration_and_vision_tower(tmp_path, data_dir, capsys):
    """Image-text calibration of an original checkpoint: the vision tower from --vision_tower, the statistics
    through the full multimodal forward, the saved folder in the original format (files byte-equal but the
    weight files, projector untouched)."""
    _, ckpt, vision_dir = build_original(str(tmp_path))
    _image().save(tmp_path / "a.png")
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps([{"id": "0", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat is it"}, {"from": "gpt", "value": "a cat on a mat"}]}]))
    out, saved = tmp_path / "out", tmp_path / "saved"
    code, log, err = run_cli(["--model", ckpt, "--vision_tower", vision_dir, "--data_dir", data_dir,
                              "--calib_dataset", str(conv), "--prune_method", "wanda", "--sparsity_ratio", "0.5",
                              "--nsamples", "2", "--seqlen", "256", "--save", str(out), "--save_model", str(saved),
                              "--device", "cpu"], capsys)
    assert code == 0, err
    res = json.load(open(out / "results_wanda.json"))
    assert res["calibration"]["image_tokens"] == 2 * 16
    for name in os.listdir(ckpt):
        a, b = open(os.path.join(ckpt, name), "rb").read(), open(os.path.join(saved, name), "rb").read()
        assert (a == b) == (not name.endswith(".safetensors")), name
    from safetensors.torch import load_file

    new = {k: v for f in os.listdir(saved) if f.endswith(".safetensors") for k, v in load_file(f"{saved}/{f}").items()}
    old = {k: v for f in os.listdir(ckpt) if f.endswith(".safetensors") for k, v in load_file(f"{ckpt}/{f}").items()}
    assert new.keys() == old.keys()
    assert all(torch.equal(new[k], old[k]) for k in old if not k.startswith("model.layers."))
    assert (new["model.layers.0.mlp.up_proj.weight"] == 0).float().mean() == pytest.approx(0.5)
