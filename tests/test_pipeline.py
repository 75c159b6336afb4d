"""Capture path, evaluation protocol, data sampling and profile formats."""
import json
import random

import pytest
import torch

from lib.data import DataError, get_calibration, get_eval_tokens, load_texts, wikitext_rows_from_file
from lib.eval import eval_ppl
from lib.layerwise import capture_layer_inputs, run_layer
from lib.models import decoder, decoder_layers, load_model, pruned_weight_names
from lib.profile import Profile, ProfileError, block_layers, load_profile


def test_capture_records_all_layer_kwargs_and_replays_the_model(tiny_llama):
    lm = load_model(tiny_llama, dtype="float32")
    ids = [torch.randint(4, len(lm.tokenizer), (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    inputs = capture_layer_inputs(lm.model, ids, "cpu")
    assert len(inputs.hidden) == 3 and inputs.hidden[0].shape == (1, 24, 64)
    assert "position_embeddings" in inputs.kwargs  # transformers 5.x: rotary computed once, passed to layers
    assert type(decoder_layers(lm.model)[0]).__name__ == "LlamaDecoderLayer"  # catcher removed
    for layer in decoder_layers(lm.model):
        inputs.hidden = run_layer(layer, inputs, "cpu")
    logits = lm.model.get_output_embeddings()(decoder(lm.model).norm(inputs.hidden[1]))
    with torch.no_grad():
        ref = lm.model(input_ids=ids[1]).logits
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_capture_replays_batches_of_different_shapes(tiny_llama):
    """Windows of different lengths and batch sizes go through the one capture path, each with its own
    layer arguments (position embeddings depend on the length); equal shapes share one argument set."""
    lm = load_model(tiny_llama, dtype="float32")
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(4, len(lm.tokenizer), shape, generator=gen) for shape in [(2, 8), (1, 13), (2, 8), (1, 5)]]
    inputs = capture_layer_inputs(lm.model, ids, "cpu")
    assert inputs.batch_kwargs[0] is inputs.batch_kwargs[2] and inputs.batch_kwargs[1] is not inputs.batch_kwargs[0]
    for layer in decoder_layers(lm.model):
        inputs.hidden = run_layer(layer, inputs, "cpu")
    for h, x in zip(inputs.hidden, ids):
        logits = lm.model.get_output_embeddings()(decoder(lm.model).norm(h))
        with torch.no_grad():
            torch.testing.assert_close(logits, lm.model(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_llava_decoder_is_the_language_model(tiny_llava):
    lm = load_model(tiny_llava, dtype="float32")
    names = pruned_weight_names(lm.model)
    assert names and all(n.startswith("model.language_model.layers.") for n in names)
    ids = torch.randint(5, len(lm.tokenizer), (1, 16))
    assert capture_layer_inputs(lm.model, [ids], "cpu").hidden[0].shape == (1, 16, 64)


def test_ppl_follows_wandas_protocol_and_offload_path_agrees(tiny_llama):
    lm = load_model(tiny_llama, dtype="float32")
    torch.manual_seed(0)
    ids = torch.randint(4, len(lm.tokenizer), (1, 100))
    seqlen = 16
    # Reference: 6 windows (tail of 4 tokens dropped), mean loss * seqlen summed, / (6 * seqlen).
    nll = 0.0
    with torch.no_grad():
        for w in range(6):
            x = ids[:, w * seqlen:(w + 1) * seqlen]
            logits = lm.model(input_ids=x).logits
            nll += torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:]).item() * seqlen
    expected = float(torch.exp(torch.tensor(nll / (6 * seqlen))))
    assert eval_ppl(lm.model, ids, seqlen) == pytest.approx(expected, rel=1e-5)
    assert eval_ppl(lm.model, ids, seqlen, batch_size=4) == pytest.approx(expected, rel=1e-5)
    assert eval_ppl(lm.model, ids, seqlen, offload=True) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="fewer than one"):
        eval_ppl(lm.model, ids[:, :10], seqlen)


def test_wikitext_rows_match_the_hub_dataset_layout(tmp_path):
    f = tmp_path / "wiki.test.raw"
    f.write_text(" \n = Title = \n \n Body text .\n", encoding="utf-8")
    assert wikitext_rows_from_file(str(f)) == ["", " = Title = \n", "", " Body text .\n"]


def test_calibration_is_seeded_and_matches_wandas_sampler(tiny_llama, data_dir):
    lm = load_model(tiny_llama, dtype="float32")
    tok = lm.tokenizer
    a = get_calibration("c4", tok, 5, seed=3, seqlen=32, data_dir=data_dir)
    b = get_calibration("c4", tok, 5, seed=3, seqlen=32, data_dir=data_dir)
    c = get_calibration("c4", tok, 5, seed=4, seqlen=32, data_dir=data_dir)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # Wanda's loop, written out: random doc until longer than seqlen, then a random window.
    docs = load_texts("c4", "train", data_dir)
    random.seed(3)
    for sample in a:
        while True:
            enc = tok(docs[random.randint(0, len(docs) - 1)], return_tensors="pt").input_ids
            if enc.shape[1] > 32:
                break
        i = random.randint(0, enc.shape[1] - 32 - 1)
        assert torch.equal(sample, enc[:, i:i + 32])
    w = get_calibration("wikitext2", tok, 3, seed=0, seqlen=32, data_dir=data_dir)
    assert all(x.shape == (1, 32) for x in w)


def test_eval_tokens_join_rows_with_blank_lines(tiny_llama, data_dir):
    tok = load_model(tiny_llama, dtype="float32").tokenizer
    rows = load_texts("wikitext2", "test", data_dir)
    want = tok("\n\n".join(rows), return_tensors="pt").input_ids
    assert torch.equal(get_eval_tokens("wikitext2", tok, data_dir), want)
    c4 = get_eval_tokens("c4", tok, data_dir, seqlen=8)
    assert c4.shape[1] <= 256 * 8


def test_missing_local_split_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_texts("wikitext2", "test", str(tmp_path))


def test_block_layout_gives_the_remainder_to_the_first_blocks():
    assert block_layers(10, 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    with pytest.raises(ProfileError):
        block_layers(4, 5)


def test_profile_round_trip_and_original_formats(tmp_path):
    p = Profile(num_layers=3, sparsity=[0.4, 0.5, 0.6], module_sparsity={2: {"mlp.up_proj": 0.7}},
                key_bits=[8, 6, 6], value_bits=[8, 8, 6], target_sparsity=0.5, model="m", method="optspa")
    path = tmp_path / "p.json"
    path.write_text(json.dumps(p.to_dict()))
    q = load_profile(str(path))
    assert q == p and q.ratio(2, "mlp.up_proj") == 0.7 and q.ratio(2, "self_attn.q_proj") == 0.6

    blocks = tmp_path / "blocks.json"
    blocks.write_text(json.dumps({"0": 0.45, "1": 0.55}))
    assert load_profile(str(blocks), num_layers=5, num_blocks=2).sparsity == [0.45, 0.45, 0.45, 0.55, 0.55]
    with pytest.raises(ProfileError, match="--num_blocks"):
        load_profile(str(blocks), num_layers=5, num_blocks=3)

    fine = tmp_path / "fine.json"
    fine.write_text(json.dumps({"0-self_attn.q_proj": 0.5, "1-mlp.down_proj": 0.25}))
    f = load_profile(str(fine), num_layers=2)
    assert f.ratio(1, "mlp.down_proj") == 0.25
    with pytest.raises(ProfileError, match="no entries for layer"):
        load_profile(str(fine), num_layers=3)

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(str(bad))
    with pytest.raises(ProfileError, match="outside"):
        Profile(num_layers=1, sparsity=[1.2]).validate(1)


def _decoder_modules(hidden: int, q: int, kv: int, inter: int) -> dict[str, tuple[int, int]]:
    return {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
            "self_attn.o_proj": (hidden, q), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
            "mlp.down_proj": (hidden, inter)}


SHIPPED_MODELS = {  # the models profiles/ has searched profiles for: decoder layers and linear shapes
    "smollm2-135m": (30, _decoder_modules(576, 576, 192, 1536)),
    "llama-c4-5m": (8, _decoder_modules(192, 192, 64, 512)),
}


def test_shipped_profiles_are_valid_for_their_models():
    """profiles/*.json (searched on SmolLM2-135M: 30 layers, and on the 8-layer testbed toy) load, validate and
    hit their target exactly."""
    import glob
    import os

    from conftest import ROOT
    from lib.search_space import realized_sparsity

    files = sorted(glob.glob(os.path.join(ROOT, "profiles", "*.json")))
    assert any(os.path.basename(f).startswith("smollm2-135m_") for f in files)
    for path in files:
        layers, modules = SHIPPED_MODELS[os.path.basename(path).split("_profile_")[0]]
        shapes = {(i, n): s for i in range(layers) for n, s in modules.items()}
        p = load_profile(path, num_layers=layers)
        p.validate(layers, list(modules))
        assert p.meta["wasted_fraction"] == 0 and p.meta["shipped"] in ("oneshot", "sequential")
        counts = {u: int(c * p.ratio(*u)) for u, (_, c) in shapes.items()}
        assert abs(realized_sparsity(shapes, counts) - p.target_sparsity) < 1e-4
