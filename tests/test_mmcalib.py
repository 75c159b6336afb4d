"""Image-text calibration in LLaVA's conversation format, through the one capture path (lib/layerwise.py)."""
import json
import os

import pytest
import torch

from lib import mmdata
from lib.data import DataError
from lib.layerwise import capture_layer_inputs, run_layer
from lib.models import decoder_layers, load_model, pruned_weight_names
from lib.models import load_processor as _load_processor
from lib.profile import Profile
from lib.prune import prune_optspa
from lib.sparsity import SparsityType

TESTBED = os.environ.get("OPTSPA_TESTBED", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "testbed"))
TESTBED_LLAVA = os.path.join(TESTBED, "llava-c4-5m")
TESTBED_IMAGES = os.path.join(TESTBED, "images")


def load_processor(folder):
    """The fixture's processor, counting the CLS position the model drops (num_additional_image_tokens=1), so
    the <image> expansion matches the features (16 for 32 px, 8 px patches)."""
    proc = _load_processor(folder)
    proc.num_additional_image_tokens = 1
    return proc


def calib(*args, **kw):
    kw.setdefault("system", "")  # the tiny models hold 64 positions; LLaVA's system line alone is longer
    return mmdata.get_image_text_calibration(*args, **kw)


@pytest.fixture
def tiny_set(tmp_path):
    """Three random images and conversations of different lengths (one record without an image)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i, (w, h) in enumerate([(40, 32), (32, 32), (24, 48)]):
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(tmp_path / f"img{i}.png")
    recs = [
        {"id": "0", "image": "img0.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is the cat on"}, {"from": "gpt", "value": "a mat"}]},
        {"id": "1", "image": "img1.png", "conversations": [
            {"from": "human", "value": "describe the image"},
            {"from": "gpt", "value": "the cat sat on a mat while model weights were pruned by rows"},
            {"from": "human", "value": "and then"}, {"from": "gpt", "value": "attention heads keys values"}]},
        {"id": "2", "image": "img2.png", "conversations": [
            {"from": "human", "value": "<image>\nlayer decoder"}, {"from": "gpt", "value": "sparsity bits"}]},
        {"id": "3", "conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "skip"}]},
    ]
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(recs))
    return str(path)


def test_windows_hold_image_tokens_and_differ_in_length(tiny_llava, tiny_set):
    lm = load_model(tiny_llava, dtype="float32")
    proc = load_processor(tiny_llava)
    img_id = lm.model.config.image_token_index
    wins = calib(tiny_set, proc, 6, 0, 64, img_id)
    assert len(wins) == 6 and all(w.shape[0] == 1 and w.shape[1] <= 64 for w in wins)
    assert len({w.shape[1] for w in wins}) > 1
    per_image = (32 // 8) ** 2  # the tiny CLIP: 32 px, 8 px patches, CLS dropped
    assert all(int((w == img_id).sum()) == per_image for w in wins)
    stats = mmdata.window_stats(wins, img_id)
    assert stats.image_tokens == 6 * per_image and 0 < stats.image_share < 1
    # record 1 has no <image> in its text: the image goes first in the first user turn, as LLaVA does
    assert "USER: <image>\ndescribe" in mmdata.render(json.load(open(tiny_set))[1]["conversations"], "</s>")
    assert mmdata.render([{"from": "human", "value": "q"}], "</s>").startswith(mmdata.SYSTEM + " USER: <image>\nq")
    # same seed, same windows
    again = calib(tiny_set, proc, 6, 0, 64, img_id)
    assert all(torch.equal(a, b) for a, b in zip(wins, again))


def test_capture_path_runs_the_multimodal_forward(tiny_llava, tiny_set):
    """Layer-0 inputs captured from image windows of different lengths are the full forward's (image features
    merged in), and the statistics a linear sees through the capture path equal a hook on the full forward."""
    lm = load_model(tiny_llava, dtype="float32")
    proc = load_processor(tiny_llava)
    model = lm.model
    img_id = model.config.image_token_index
    wins = calib(tiny_set, proc, 4, 1, 64, img_id)
    inputs = capture_layer_inputs(model, wins, "cpu")
    assert [h.shape[1] for h in inputs.hidden] == [w.shape[1] for w in wins]
    q = decoder_layers(model)[0].self_attn.q_proj
    seen, full = [], []
    handle = q.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].detach().clone()))
    try:
        run_layer(decoder_layers(model)[0], inputs, "cpu", keep=False)
        captured, seen = seen, []
        with torch.no_grad():
            for w in wins:
                out = model(input_ids=w, **w.mm_inputs, output_hidden_states=True, use_cache=False)
                full.append(out.hidden_states[0])
        reference = seen
    finally:
        handle.remove()
    for h, f in zip(inputs.hidden, full):
        torch.testing.assert_close(h, f, rtol=1e-5, atol=1e-6)
    for a, b in zip(captured, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the image positions hold image features, not the <image> token's embedding
    emb = model.get_input_embeddings()(wins[0])
    pos = wins[0][0] == img_id
    assert not torch.allclose(inputs.hidden[0][0, pos], emb[0, pos])


def test_pruning_with_image_windows_differs_from_text_only(tiny_llava, tiny_set):
    proc = load_processor(tiny_llava)
    masks = {}
    for kind in ("image", "text"):
        lm = load_model(tiny_llava, dtype="float32")
        img_id = lm.model.config.image_token_index
        wins = calib(tiny_set, proc, 4, 0, 64, img_id)
        if kind == "text":  # the same token ids, without the pixels: the image token's embedding instead
            wins = [w.clone() for w in wins]
        before = {n: p.clone() for n, p in lm.model.named_parameters()}
        prune_optspa(lm.model, wins, Profile.uniform(2, 0.5), SparsityType())
        changed = {n for n, p in lm.model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == set(pruned_weight_names(lm.model))  # vision tower and projector untouched
        masks[kind] = {n: p == 0 for n, p in lm.model.named_parameters() if n in changed}
    assert any(not torch.equal(masks["image"][n], masks["text"][n]) for n in masks["image"])


def test_image_text_nll_scores_text_tokens_only(tiny_llava, tiny_set):
    lm = load_model(tiny_llava, dtype="float32")
    proc = load_processor(tiny_llava)
    img_id = lm.model.config.image_token_index
    wins = calib(tiny_set, proc, 3, 0, 64, img_id)
    total, count = mmdata.image_text_nll(lm.model, wins, "cpu")
    want_total, want_count = 0.0, 0
    with torch.no_grad():
        for w in wins:
            labels = w.clone()
            labels[labels == img_id] = -100
            out = lm.model(input_ids=w, **w.mm_inputs, labels=labels, use_cache=False)
            n = int((labels[0, 1:] != -100).sum())
            want_total += float(out.loss) * n
            want_count += n
    assert count == want_count and total == pytest.approx(want_total, rel=1e-5)


def test_bad_image_text_input_is_a_one_line_error(tiny_llava, tiny_set, tmp_path):
    proc = load_processor(tiny_llava)
    with pytest.raises(DataError, match="--seqlen"):
        calib(tiny_set, proc, 2, 0, 8, 4)
    with pytest.raises(DataError, match="not found"):
        calib(tiny_set, proc, 2, 0, 64, 4, image_dir=str(tmp_path / "..") )
    with pytest.raises(DataError, match="--data_dir"):
        mmdata.dataset_file("llava_instruct", data_dir=str(tmp_path))
    assert mmdata.is_image_text("llava_instruct") and mmdata.is_image_text("x.json") and not mmdata.is_image_text("c4")


@pytest.mark.skipif(not os.path.isdir(TESTBED_LLAVA), reason="needs the testbed's llava-c4-5m (real LM weights)")
def test_testbed_wrapper_prunes_on_image_text_windows(tmp_path):
    conv = mmdata.conversations_from_questions(os.path.join(TESTBED_IMAGES, "questions.jsonl"),
                                               str(tmp_path / "q.json"))
    lm = load_model(TESTBED_LLAVA, dtype="float32")
    proc = _load_processor(TESTBED_LLAVA)
    img_id = lm.model.config.image_token_index
    wins = mmdata.get_image_text_calibration(conv, proc, 8, 0, 512, img_id, image_dir=TESTBED_IMAGES)
    stats = mmdata.window_stats(wins, img_id)
    assert stats.image_tokens == 8 * 16  # 64 px, 16 px patches
    before_ppl = torch.exp(torch.tensor(mmdata.image_text_nll(lm.model, wins, "cpu")[0] / stats.tokens))
    prune_optspa(lm.model, wins, Profile.uniform(len(decoder_layers(lm.model)), 0.5), SparsityType())
    total, count = mmdata.image_text_nll(lm.model, wins, "cpu")
    assert torch.isfinite(torch.tensor(total)) and count > 0 and before_ppl > 1


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture
def llava_folder(tiny_llava, tmp_path):
    """The tiny LLaVA with a processor that counts the CLS position the model drops (16 image tokens)."""
    import shutil

    folder = tmp_path / "tiny-llava-proc"
    shutil.copytree(tiny_llava, folder)
    load_processor(tiny_llava).save_pretrained(str(folder))
    return str(folder)


def test_cli_image_text_calibration(llava_folder, tiny_set, data_dir, tmp_path, capsys):
    from conftest import run_cli

    out = tmp_path / "out"
    code, log, err = run_cli(["--model", llava_folder, "--data_dir", data_dir, "--calib_dataset", tiny_set,
                              "--prune_method", "wanda", "--sparsity_ratio", "0.5", "--nsamples", "4",
                              "--seqlen", "256", "--save", str(out), "--device", "cpu"], capsys)
    assert code == 0, err
    assert "image-text calibration: 4 windows" in log
    res = json.load(open(out / "results_wanda.json"))
    assert res["calibration"]["image_tokens"] == 4 * 16 and res["calibration"]["windows"] == 4
    assert res["calibration"]["image_token_share"] == pytest.approx(64 / res["calibration"]["tokens"], abs=1e-4)
    assert all(".language_model.layers." in k for k in json.load(open(out / "masks.json"))["modules"])


@pytest.mark.parametrize("extra, needle", [
    (["--calib_dataset", "imagenet"], "--calib_dataset imagenet"),
    (["--calib_dataset", "missing.json"], "does not exist"),
    (["--calib_dataset", "IMAGE_SET", "--image_dir", "/no/such/dir"], "--image_dir"),
    (["--vision_tower", "/no/such/dir"], "--vision_tower"),
    (["--calib_dataset", "IMAGE_SET", "--objective", "kl", "--search", "sparsity", "--save", "/tmp/x"],
     "image-conditioned perplexity"),
])
def test_cli_bad_image_flags_exit_2(tiny_llama, tiny_set, data_dir, capsys, extra, needle):
    from conftest import run_cli

    extra = [tiny_set if a == "IMAGE_SET" else a for a in extra]
    code, _, err = run_cli(["--model", tiny_llama, "--data_dir", data_dir, "--prune_method", "wanda",
                            "--sparsity_ratio", "0.5", *extra], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_cli_image_calibration_needs_a_llava_model(tiny_llama, tiny_set, data_dir, capsys):
    from conftest import run_cli

    code, _, err = run_cli(["--model", tiny_llama, "--data_dir", data_dir, "--calib_dataset", tiny_set,
                            "--prune_method", "wanda", "--sparsity_ratio", "0.5", "--seqlen", "64"], capsys)
    assert code == 2 and "need a LLaVA model" in err and len(err.strip().splitlines()) == 1


def test_image_text_objective_is_image_conditioned_perplexity(tiny_llava, tiny_set):
    """The search objective over image-text windows: the text tokens' perplexity under the full multimodal
    forward, window by window (the pruner sees running values), equal to image_text_nll."""
    from lib.objective import Objective

    lm = load_model(tiny_llava, dtype="float32")
    proc = load_processor(tiny_llava)
    img_id = lm.model.config.image_token_index
    wins = calib(tiny_set, proc, 3, 1, 64, img_id)
    total, count = mmdata.image_text_nll(lm.model, wins, "cpu")
    steps = []
    value = Objective(lm.model, wins, 64, 3, "cpu", False)(lambda s, v: steps.append(s))
    assert value == pytest.approx(float(torch.exp(torch.tensor(total / count, dtype=torch.float64))), rel=1e-9)
    assert steps == [1, 2]


def test_cli_search_scored_on_image_conditioned_loss(llava_folder, tiny_set, data_dir, tmp_path, capsys):
    from conftest import run_cli

    out = tmp_path / "out"
    code, log, err = run_cli(["--model", llava_folder, "--data_dir", data_dir, "--calib_dataset", tiny_set,
                              "--objective_dataset", tiny_set, "--objective_nsamples", "2", "--prune_method",
                              "optspa", "--sparsity_ratio", "0.5", "--nsamples", "4", "--n_trials", "3",
                              "--seqlen", "256", "--save", str(out), "--device", "cpu"], capsys)
    assert code == 0, err
    assert "image-text objective: 2 windows" in log and "trial 0:" in log
    res = json.load(open(out / "results_optspa.json"))["search"]
    assert res["shipped_value"] <= res["best_value"] and res["complete_trials"] >= 1
