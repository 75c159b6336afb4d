"""Head-wise KV budgets: allocation (lib/kvbudget.py), the eviction cache (lib/kvevict.py), the head-score probes
(lib/headscores.py, lib/probe_images.py).  Tiny random models built from configs; references written out plainly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import (
    AttentionInterface,
    CLIPVisionConfig,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from conftest import tiny_llama_config as base_llama_config
from lib.headscores import _score_step, copy_head_scores, head_score_tensor, visual_head_scores
from lib.kvbudget import (
    KVBudgetConfig,
    allocate_budgets,
    head_scores_from_json,
    load_head_scores,
    redistribute_capped,
    save_head_scores,
    scores_to_json,
)
from lib.kvevict import EvictionKVCache, capture_prefill, kv_budget_attention
from lib.kvquant import KVQuantConfig, fake_quantize_stream
from lib.probe_images import box_patches, generate_probe_images

VOCAB = 128
IMAGE_TOKEN = 127
LAYERS, HEADS, KV_HEADS, HEAD_DIM = 2, 4, 2, 16


def tiny_llama_config(**overrides) -> LlamaConfig:
    # wider init than the 0.02 default so that greedy decisions are not near-ties; room for long prompts
    return base_llama_config(VOCAB, max_position_embeddings=256, initializer_range=0.1, pad_token_id=None,
                             **overrides)


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope="module")
def llava() -> LlavaForConditionalGeneration:
    torch.manual_seed(1)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    cfg = LlavaConfig(vision_config=vision, text_config=tiny_llama_config(), image_token_index=IMAGE_TOKEN)
    return LlavaForConditionalGeneration(cfg).eval()


def prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, IMAGE_TOKEN, (1, n), generator=torch.Generator().manual_seed(seed))


def scores(seed: int = 0) -> torch.Tensor:
    return torch.rand(LAYERS, HEADS, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def budget_cfg(budget: int, head_scores=None, window: int = 8, **kw) -> KVBudgetConfig:
    return KVBudgetConfig.build(budget, LAYERS, KV_HEADS, scores=head_scores, window=window, **kw)


# ------------------------------------------------------------------------------------------------ allocation
def test_allocation_follows_sparsemm() -> None:
    s = torch.tensor([[4.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 0.0]], dtype=torch.float64)
    caps = allocate_budgets(s, budget=72, window=8, num_layers=2, num_kv_heads=2, floor_ratio=0.25)
    base, floor = 64, 16
    remain = (base - floor) * 4
    share = torch.tensor([[4.0, 2.0], [0.0, 2.0]]) / 8  # query heads summed per GQA group (2 per KV head)
    expected = share * remain + floor
    assert caps.tolist() == expected.round().long().tolist() == [[112, 64], [16, 64]]
    assert int(caps.sum()) == base * 4


def test_allocation_total_is_exact_and_uniform_is_snapkv() -> None:
    for seed in range(5):
        caps = allocate_budgets(scores(seed), 100, 8, LAYERS, KV_HEADS)
        assert int(caps.sum()) == 92 * LAYERS * KV_HEADS and int(caps.min()) >= int(92 * 0.1)
    for s in (torch.ones(LAYERS, HEADS), torch.full((30, 9), 0.37)):
        layers, kv = s.shape[0], 3 if s.shape[1] == 9 else KV_HEADS
        for budget in (40, 64, 256, 512):
            assert torch.equal(allocate_budgets(s, budget, 32 if budget > 32 else 8, layers, kv),
                               allocate_budgets(None, budget, 32 if budget > 32 else 8, layers, kv))


def test_redistribution_caps_at_prompt_and_keeps_total() -> None:
    caps = torch.tensor([[150, 10], [30, 40]])
    out = redistribute_capped(caps, max_capacity=100, floor=10)
    # the 50 the first head cannot hold go to the others by their share above the floor (20 : 30); the head at
    # the floor gets none
    assert out.tolist() == [[100, 10], [50, 70]]
    out = redistribute_capped(torch.tensor([[300, 10], [30, 40]]), max_capacity=100, floor=10)
    assert int(out.max()) <= 100 and int(out.sum()) == 380
    # more than the prompt can hold: everything is kept
    assert redistribute_capped(torch.full((2, 2), 50), 20).tolist() == [[20, 20], [20, 20]]
    # uniform capacities are only clamped
    assert torch.equal(redistribute_capped(torch.full((3, 3), 7), 30), torch.full((3, 3), 7))


def test_bad_budgets_raise() -> None:
    with pytest.raises(ValueError, match="window"):
        allocate_budgets(None, 4, 8, 2, 2)
    with pytest.raises(ValueError, match="all zero"):
        allocate_budgets(torch.zeros(2, 4), 64, 8, 2, 2)
    with pytest.raises(ValueError, match="do not fit"):
        allocate_budgets(torch.ones(3, 4), 64, 8, 2, 2)
    with pytest.raises(ValueError, match="pooling"):
        KVBudgetConfig(budget=8, capacities=[[1]], pooling="median")
    with pytest.raises(ValueError, match="model has"):
        budget_cfg(32).validate(3, KV_HEADS)


def test_head_score_json_both_ways(tmp_path) -> None:
    per_sample = {(l, h): [0.5 * l + h, float(h)] for l in range(LAYERS) for h in range(HEADS)}
    path = str(tmp_path / "scores.json")
    save_head_scores(path, per_sample)
    data = json.loads(open(path).read())
    assert list(data)[:2] == ["0-0", "0-1"] and data["1-3"] == [3.5, 3.0]  # SparseMM's "layer-head": [scores]
    loaded = load_head_scores(path, LAYERS, HEADS)
    assert torch.equal(loaded, head_score_tensor(per_sample, LAYERS, HEADS))
    assert loaded[1, 3] == pytest.approx(3.25)
    # a SparseMM file (lists of per-sample floats, or plain numbers) loads too
    sparsemm = {f"{l}-{h}": [0.0, 0.25, 0.5] for l in range(LAYERS) for h in range(HEADS)}
    sparsemm["1-2"] = 2.0
    got = head_scores_from_json(sparsemm, LAYERS, HEADS)
    assert got[0, 0] == 0.25 and got[1, 2] == 2.0
    assert scores_to_json({(0, 1): [1]}) == {"0-1": [1.0]}
    del sparsemm["0-0"]
    with pytest.raises(ValueError, match="miss"):
        head_scores_from_json(sparsemm, LAYERS, HEADS)
    with pytest.raises(ValueError, match="outside"):
        head_scores_from_json({"5-0": [1.0]}, LAYERS, HEADS)
    with pytest.raises(ValueError, match="LAYER-HEAD"):
        head_scores_from_json({"a": [1.0]}, LAYERS, HEADS)


# ------------------------------------------------------------------------------------------------ plain references
def reference_snapkv(query, keys, window, kernel, pooling, scaling, capacities):
    """SnapKV written out with loops: window attention summed, averaged per GQA group, pooled, top-k + window."""
    _, hq, _, _ = query.shape
    hkv, t = keys.shape[1], keys.shape[2]
    groups, w = hq // hkv, min(window, t)
    n = t - w
    kept = []
    for h in range(hkv):
        acc = [0.0] * n
        for g in range(groups):
            qh = h * groups + g
            for i in range(w):
                pos = t - w + i
                logits = [float(query[0, qh, query.shape[2] - w + i] @ keys[0, h, j]) * scaling for j in range(pos + 1)]
                m = max(logits)
                e = [math.exp(x - m) for x in logits]
                z = sum(e)
                for j in range(n):
                    acc[j] += e[j] / z / groups
        pooled = []
        for j in range(n):
            win = [acc[k] if 0 <= k < n else 0.0 for k in range(j - kernel // 2, j + kernel // 2 + 1)]
            pooled.append(max(win) if pooling == "maxpool" else sum(win) / kernel)
        c = min(capacities[h], n)
        top = sorted(range(n), key=lambda j: (-pooled[j], j))[:c]
        kept.append(sorted(top) + list(range(n, t)))
    return kept


@pytest.mark.parametrize("pooling,kernel", [("maxpool", 7), ("avgpool", 5)])
def test_kept_indices_equal_plain_snapkv(llama, pooling, kernel) -> None:
    ids = prompt(48, seed=2)
    budget = budget_cfg(20, scores(1), window=6, pooling=pooling, kernel=kernel)
    states, _ = capture_prefill(llama, ids, window=budget.window)
    cache = EvictionKVCache.from_prefill(budget, states)
    caps = budget.capacities_for(48)
    assert len({int(c) for c in caps.flatten()}) > 1  # different budgets per head
    for layer, (keys, _, q, scaling) in zip(cache.layers, states):
        ref = reference_snapkv(q, keys, budget.window, kernel, pooling, scaling, caps[layer.layer_idx].tolist())
        got = [p[0].tolist() for p in layer.kept_positions]
        assert got == ref
    # the same indices through a real prefill
    with torch.no_grad(), kv_budget_attention(llama):
        live = EvictionKVCache.for_model(llama, budget)
        llama(ids, past_key_values=live, use_cache=True)
    for a, b in zip(live.layers, cache.layers):
        assert all(torch.equal(x, y) for x, y in zip(a.kept_positions, b.kept_positions))


# ------------------------------------------------------------------------------------------------ cache behaviour
def test_budget_covering_the_prompt_equals_dynamic_cache(llama) -> None:
    ids = prompt(30, seed=1)
    ref = llama.generate(ids, max_new_tokens=10, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with kv_budget_attention(llama):
        cache = EvictionKVCache.for_model(llama, budget_cfg(30, scores(0)))  # floor 2 < prompt: re-shared to all
        out = llama.generate(ids, past_key_values=cache, max_new_tokens=10, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores))  # bit-identical logits
    assert cache.kept_lengths() == [[39, 39], [39, 39]] and cache.get_seq_length() == 39
    assert llama.config._attn_implementation == "sdpa"  # restored


def test_kept_lengths_equal_allocation(llama) -> None:
    ids = prompt(60, seed=4)
    budget = budget_cfg(24, scores(3), window=4)
    with kv_budget_attention(llama):
        cache = EvictionKVCache.for_model(llama, budget)
        llama.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False)
    expected = budget.kept(60) + 4  # 4 decode steps appended after the prefill
    assert cache.kept_lengths() == expected.tolist()
    assert budget.kept(60).sum() == (24 - 4) * LAYERS * KV_HEADS + 4 * LAYERS * KV_HEADS
    assert cache.get_seq_length() == 64


def _masked_reference_attention(kept: dict[int, list[torch.Tensor]], prefill_len: int):
    def attn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        q_len, kv_len = query.shape[2], key.shape[2]
        groups = query.shape[1] // key.shape[1]
        allowed = torch.zeros(key.shape[1], q_len, kv_len, dtype=torch.bool)
        for h, idx in enumerate(kept[module.layer_idx]):
            for i in range(q_len):
                qpos = kv_len - q_len + i
                if qpos < prefill_len:  # the prefill itself attends fully (causal)
                    allowed[h, i, : qpos + 1] = True
                else:
                    allowed[h, i, idx[0]] = True  # kept prefill tokens
                    allowed[h, i, prefill_len : qpos + 1] = True  # everything after the prefill, causally
        mask = allowed.repeat_interleave(groups, dim=0).unsqueeze(0)
        k, v = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    return attn


def test_eviction_equals_full_attention_with_evicted_keys_masked(llama) -> None:
    ids = prompt(70, seed=5)
    p = 50
    budget = budget_cfg(16, scores(5), window=4)
    with torch.no_grad(), kv_budget_attention(llama):
        cache = EvictionKVCache.for_model(llama, budget)
        llama(ids[:, :p], past_key_values=cache, use_cache=True)
        chunk = llama(ids[:, p:60], past_key_values=cache, use_cache=True).logits  # 10 tokens in one forward
        steps = [llama(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(60, 70)]
    got = torch.cat([chunk, *steps], dim=1)
    kept = {l.layer_idx: l.kept_positions for l in cache.layers}
    assert any(len(set(len(k[0]) for k in v)) > 1 for v in kept.values())  # ragged heads
    AttentionInterface.register("test_masked_ref", _masked_reference_attention(kept, p))
    AttentionMaskInterface.register("test_masked_ref", sdpa_mask)
    try:
        llama.set_attn_implementation("test_masked_ref")
        with torch.no_grad():
            ref = llama(ids, use_cache=False).logits[:, p:]
    finally:
        llama.set_attn_implementation("sdpa")
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        full = llama(ids, use_cache=False).logits[:, p:]
    assert not torch.allclose(got, full, atol=1e-3)  # eviction does change the outputs


def test_uniform_scores_equal_snapkv(llama) -> None:
    ids = prompt(64, seed=6)
    outs, kept = [], []
    for s in (None, torch.ones(LAYERS, HEADS)):
        budget = budget_cfg(20, s, window=4)
        with kv_budget_attention(llama):
            cache = EvictionKVCache.for_model(llama, budget)
            outs.append(llama.generate(ids, past_key_values=cache, max_new_tokens=6, do_sample=False))
        kept.append([[p.tolist() for p in l.kept_positions] for l in cache.layers])
        assert cache.kept_lengths() == [[20 + 5] * KV_HEADS] * LAYERS  # budget 20 includes the window
    assert torch.equal(outs[0], outs[1]) and kept[0] == kept[1]


@pytest.mark.parametrize("scheme", ["kivi", "per_token"])
def test_quantized_kept_tokens_equal_the_quantizer(llama, scheme) -> None:
    ids = prompt(80, seed=7)
    kv = KVQuantConfig(key_bits=[4, 8], value_bits=[3, 16], group_size=8, token_group_size=8, residual=2,
                       scheme=scheme)
    budget = budget_cfg(28, scores(7), window=6)
    states, _ = capture_prefill(llama, ids[:, :64], window=budget.window)
    cache = EvictionKVCache.from_prefill(budget, states, kv_config=kv)
    new_k = torch.randn(1, KV_HEADS, 5, HEAD_DIM, generator=torch.Generator().manual_seed(0))
    new_v = torch.randn(1, KV_HEADS, 5, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    for step in range(6):  # after the prefill, then after each appended token
        for layer, (keys, values, _, _) in zip(cache.layers, states):
            kb, vb = kv.layer_bits(layer.layer_idx)
            for h, idx in enumerate(layer.kept_positions):
                k_ref = torch.cat([keys[:, h : h + 1, idx[0]], new_k[:, h : h + 1, :step]], dim=2)
                v_ref = torch.cat([values[:, h : h + 1, idx[0]], new_v[:, h : h + 1, :step]], dim=2)
                k_got, v_got = layer.dequantized(h)
                assert torch.equal(k_got, fake_quantize_stream(k_ref, kb, kv.per_channel_keys, kv))
                assert torch.equal(v_got, fake_quantize_stream(v_ref, vb, False, kv))
        if step < 5:
            for layer in cache.layers:
                layer.update(new_k[:, :, step : step + 1], new_v[:, :, step : step + 1])
    held = cache.stored_tensors()
    assert cache.nbytes() == sum(t.numel() * t.element_size() for t in held)
    assert any(t.dtype == torch.uint8 for t in held)
    plain = EvictionKVCache.from_prefill(budget, states)
    assert cache.nbytes() < plain.nbytes()
    assert plain.nbytes() == int(budget.kept(64).sum()) * 2 * HEAD_DIM * 4  # K and V, float32


def test_generate_with_bits_and_budget(llama) -> None:
    ids = prompt(60, seed=8)
    kv = KVQuantConfig.uniform(8, LAYERS, group_size=8, token_group_size=8)
    with kv_budget_attention(llama):
        cache = EvictionKVCache.for_model(llama, budget_cfg(24, scores(8), window=4), kv_config=kv)
        out = llama.generate(ids, past_key_values=cache, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == 66 and cache.get_seq_length() == 65
    assert 0 < cache.nbytes() < 65 * LAYERS * KV_HEADS * HEAD_DIM * 2 * 2


def test_attention_must_be_switched(llama) -> None:
    cache = EvictionKVCache.for_model(llama, budget_cfg(16, None, window=4))
    with pytest.raises(RuntimeError, match="kv_budget_attention"), torch.no_grad():
        llama.generate(prompt(30), past_key_values=cache, max_new_tokens=3, do_sample=False)


def test_llava_generate_with_image(llava) -> None:
    # default feature strategy drops CLS: (32 / 8)^2 = 16 image tokens
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, 16), IMAGE_TOKEN), prompt(14, seed=9)], dim=1)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ref = llava.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=6, do_sample=False)
    kv = KVQuantConfig.uniform(4, LAYERS, group_size=8, token_group_size=8)
    with kv_budget_attention(llava):
        assert llava.config.vision_config._attn_implementation != "optspa_kvbudget"
        same = EvictionKVCache.for_model(llava, budget_cfg(64, scores(9)))
        out_same = llava.generate(input_ids=ids, pixel_values=pixels, past_key_values=same, max_new_tokens=6,
                                  do_sample=False)
        budget = budget_cfg(12, scores(9), window=4)
        cache = EvictionKVCache.for_model(llava, budget, kv_config=kv)
        out = llava.generate(input_ids=ids, pixel_values=pixels, past_key_values=cache, max_new_tokens=6,
                             do_sample=False)
    assert torch.equal(out_same, ref)
    assert out.shape == ref.shape and cache.get_seq_length() == 31 + 5
    assert cache.kept_lengths() == (budget.kept(31) + 5).tolist()
    # image tokens (positions 1..16) are candidates like any other token
    kept = torch.cat([p[0] for l in cache.layers for p in l.kept_positions])
    assert ((kept >= 1) & (kept <= 16)).any()


# ------------------------------------------------------------------------------------------------ probes
def test_probe_images_have_text_inside_boxes() -> None:
    samples = generate_probe_images(3, size=96, words_per_image=3, seed=1)
    assert len(samples) == 3 and all(len(s.chunks) == 3 for s in samples)
    again = generate_probe_images(3, size=96, words_per_image=3, seed=1)
    assert [c.text for c in samples[2].chunks] == [c.text for c in again[2].chunks]
    for s in samples:
        dark = torch.from_numpy(np.asarray(s.image.convert("L")).copy()) < 128
        inside = torch.zeros_like(dark)
        for c in s.chunks:
            x0, y0, x1, y1 = c.box
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
            assert dark[y0:y1, x0:x1].any()
            inside[y0:y1, x0:x1] = True
        assert not (dark & ~inside).any()  # no ink outside the boxes
    assert box_patches((0, 0, 10, 10), 32, 4) == [0, 1, 4, 5]
    assert box_patches((24, 24, 32, 32), 32, 4) == [15]


def test_scoring_rule() -> None:
    s = torch.zeros(2, 3, dtype=torch.float64)
    top1 = {0: torch.tensor([[[5, 7], [9, 9], [6, 6]]]), 1: torch.tensor([[[0, 1], [7, 8], [2, 2]]])}
    _score_step(s, top1, -1, torch.tensor([6, 7, 8, 9]))  # last query: heads whose top-1 key is in the chunk
    assert s.tolist() == [[0.25, 0.25, 0.25], [0.0, 0.25, 0.0]]


def test_visual_probe_runs_on_tiny_llava(tiny_llava) -> None:
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava, dtype=torch.float32).eval()
    # CLIP keeps a CLS feature that the "default" strategy drops: 16 patch tokens per image
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                             crop_size={"height": 32, "width": 32}),
                          tokenizer=AutoTokenizer.from_pretrained(tiny_llava), patch_size=8, image_token="<image>",
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
    n_layers, n_heads = model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads
    tok = proc.tokenizer
    everything = "".join(tok.decode([i]).strip().lower() for i in range(len(tok)))
    samples = generate_probe_images(2, size=32, words_per_image=2)
    for s in samples:  # one chunk whose text holds every token string: every generated token is a hit
        s.chunks = [type(s.chunks[0])(everything, (0, 0, 16, 16))]
    per_sample = visual_head_scores(model, proc, samples, prompt="USER: <image>\nthe cat ASSISTANT:",
                                    max_new_tokens=4, min_chars=1)
    assert set(per_sample) == {(l, h) for l in range(n_layers) for h in range(n_heads)}
    assert all(len(v) == 2 for v in per_sample.values())
    # the box covers 2 x 2 of the 4 x 4 patches: every score is a multiple of 1/4, at most one hit per step
    assert all(abs(x * 4 - round(x * 4)) < 1e-9 and 0 <= x <= 4 * 0.25 for v in per_sample.values() for x in v)
    assert sum(sum(v) for v in per_sample.values()) > 0
    assert model.get_decoder().config._attn_implementation == "sdpa"


def test_copy_probe_layout() -> None:
    """Runs end to end on a random model (which does not copy, so scores are mostly 0): SparseMM's layout."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    per_sample = copy_head_scores(model, n_samples=2, length=16, seed=0)
    assert set(per_sample) == {(l, h) for l in range(LAYERS) for h in range(HEADS)}
    assert all(len(v) == 2 and all(x >= 0 for x in v) for v in per_sample.values())


def test_continuation_nll_matches_one_forward(llama) -> None:
    from lib.kvevict import continuation_nll, dynamic_cache_from_prefill, keep_all_budget

    seg = prompt(48, seed=11)
    full = keep_all_budget(LAYERS, KV_HEADS, window=8)
    small = budget_cfg(16, scores(11))
    res = continuation_nll(llama, seg, 36, {
        "dynamic": dynamic_cache_from_prefill,
        "keep_all": lambda st: EvictionKVCache.from_prefill(full, st),
        "evicted": lambda st: EvictionKVCache.from_prefill(small, st),
    }, window=8)
    with torch.no_grad():
        logits = llama(seg, use_cache=False).logits[0, 35:-1].double()
    ref = float(torch.nn.functional.cross_entropy(logits, seg[0, 36:], reduction="sum"))
    assert res["dynamic"]["tokens"] == 12
    assert res["dynamic"]["nll"] == pytest.approx(ref, rel=1e-5)
    assert res["keep_all"]["nll"] == pytest.approx(ref, rel=1e-5)
    assert res["evicted"]["nll"] != pytest.approx(ref, rel=1e-3)
    assert res["evicted"]["nbytes"] == int(small.kept(36).sum()) * 2 * HEAD_DIM * 4 < res["dynamic"]["nbytes"]


def test_unpadded_batch_equals_single_rows(llama) -> None:
    ids = torch.cat([prompt(50, seed=12), prompt(50, seed=13)])
    budget = budget_cfg(20, scores(12), window=4)
    with torch.no_grad(), kv_budget_attention(llama):
        batch = EvictionKVCache.for_model(llama, budget)
        llama(ids[:, :40], past_key_values=batch, use_cache=True)
        got = llama(ids[:, 40:], past_key_values=batch, use_cache=True).logits
        for row in range(2):
            single = EvictionKVCache.for_model(llama, budget)
            llama(ids[row : row + 1, :40], past_key_values=single, use_cache=True)
            ref = llama(ids[row : row + 1, 40:], past_key_values=single, use_cache=True).logits
            assert torch.allclose(got[row : row + 1], ref, atol=1e-5)
            for a, b in zip(batch.layers, single.layers):
                assert all(torch.equal(x[row], y[0]) for x, y in zip(a.kept_positions, b.kept_positions))


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_budget_with_head_scores_and_bits(tiny_llama, data_dir, tmp_path, capsys) -> None:
    from conftest import run_cli

    heads = tmp_path / "heads.json"
    save_head_scores(str(heads), {(l, h): [float(l + h), 1.0] for l in range(2) for h in range(4)})
    out_dir = tmp_path / "out"
    code, out, err = run_cli(["--model", tiny_llama, "--data_dir", data_dir, "--prune_method", "wanda",
                              "--sparsity_ratio", "0.5", "--nsamples", "2", "--seqlen", "32", "--kv_bits", "8",
                              "--kv_group_size", "8", "--kv_token_group", "8", "--kv_budget", "12", "--kv_window",
                              "4", "--head_scores", str(heads), "--kv_segments", "2", "--save", str(out_dir)], capsys)
    assert code == 0, err
    assert "continuation perplexity" in out
    res = json.loads((out_dir / "kv_budget_wanda.json").read_text())
    assert res["prefill"] == 48 and res["continuation"] == 16 and res["segments"] == 2
    assert res["ppl_budget"] > 0 and res["ppl_full"] > 0 and res["kv"]["key_bits"] == [8, 8]
    caps = res["budget"]["capacities"]
    assert sum(map(sum, caps)) == 8 * 2 * 2 and len({c for row in caps for c in row}) > 1
    profile = json.loads(next(out_dir.glob("profile_*.json")).read_text())
    assert profile["kv_budget"]["capacities"] == caps and profile["kv_bits"]["key"] == [8, 8]


def test_cli_writes_head_scores(tiny_llama, data_dir, tmp_path, capsys) -> None:
    from conftest import run_cli

    heads = tmp_path / "probe.json"
    code, _, err = run_cli(["--model", tiny_llama, "--data_dir", data_dir, "--prune_method", "dense",
                            "--seqlen", "32", "--head_scores_out", str(heads), "--head_probe", "copy",
                            "--head_probe_samples", "2"], capsys)
    assert code == 0, err
    data = json.loads(heads.read_text())
    assert sorted(data) == sorted(f"{l}-{h}" for l in range(2) for h in range(4))
    assert all(len(v) == 2 for v in data.values())


@pytest.mark.parametrize("extra,message", [
    (["--kv_budget", "2", "--kv_window", "4"], "at least --kv_window"),
    (["--kv_budget", "64", "--head_scores", "/nonexistent/h.json"], "no such file"),
    (["--kv_budget", "64", "--kv_kernel", "4"], "odd"),
])
def test_cli_bad_budget_flags(tiny_llama, data_dir, capsys, extra, message) -> None:
    from conftest import run_cli

    code, _, err = run_cli(["--model", tiny_llama, "--data_dir", data_dir, "--prune_method", "dense", *extra], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_cli_head_scores_that_do_not_fit(tiny_llama, data_dir, tmp_path, capsys) -> None:
    from conftest import run_cli

    heads = tmp_path / "other_model.json"
    save_head_scores(str(heads), {(l, h): [1.0] for l in range(3) for h in range(4)})
    code, _, err = run_cli(["--model", tiny_llama, "--data_dir", data_dir, "--prune_method", "dense", "--seqlen",
                            "32", "--kv_budget", "16", "--kv_window", "4", "--head_scores", str(heads)], capsys)
    assert code == 2 and "outside the model" in err and len(err.strip().splitlines()) == 1


def test_cli_profile_budgets_reload(tiny_llama, data_dir, tmp_path, capsys, monkeypatch) -> None:
    """A saved profile's per-head budgets (and bits) are evaluated as saved: the same continuation perplexity,
    no head scores needed, the profile file read once; a budget-only --kv_profile works on a dense model;
    misfits fail in one line."""
    import lib.profile
    from conftest import run_cli

    reads = []
    real_load = lib.profile.load_profile
    monkeypatch.setattr(lib.profile, "load_profile",
                        lambda path, *a, **kw: reads.append(path) or real_load(path, *a, **kw))

    heads = tmp_path / "heads.json"
    save_head_scores(str(heads), {(l, h): [float(3 * l + h), 1.0] for l in range(2) for h in range(4)})
    common = ["--model", tiny_llama, "--data_dir", data_dir, "--nsamples", "2", "--seqlen", "32",
              "--kv_group_size", "8", "--kv_token_group", "8", "--kv_segments", "2"]
    first = tmp_path / "first"
    code, _, err = run_cli([*common, "--prune_method", "wanda", "--sparsity_ratio", "0.5", "--kv_bits", "4",
                            "--kv_budget", "12", "--kv_window", "4", "--head_scores", str(heads),
                            "--save", str(first)], capsys)
    assert code == 0, err
    saved = json.loads((first / "kv_budget_wanda.json").read_text())
    profile_path = next(first.glob("profile_*.json"))
    again = tmp_path / "again"
    code, out, err = run_cli([*common, "--prune_method", "wanda", "--sparsity_profile", str(profile_path),
                              "--save", str(again)], capsys)
    assert code == 0, err
    assert "per-head KV budgets from --sparsity_profile" in out
    assert reads == [str(profile_path)]  # budgets, bits and ratios come from one read
    res = json.loads((again / "kv_budget_wanda.json").read_text())
    assert res["budget"]["capacities"] == saved["budget"]["capacities"]
    assert res["kv"]["key_bits"] == [4, 4] and res["ppl_budget"] == saved["ppl_budget"]

    # budgets only (no bits): the dense model with the saved eviction, unquantized
    data = json.loads(profile_path.read_text())
    data["kv_bits"] = None
    budget_only = tmp_path / "budget_only.json"
    budget_only.write_text(json.dumps(data))
    dense = tmp_path / "dense"
    reads.clear()
    code, out, err = run_cli([*common, "--prune_method", "dense", "--kv_profile", str(budget_only),
                              "--save", str(dense)], capsys)
    assert code == 0, err
    assert reads == [str(budget_only)]
    res = json.loads((dense / "kv_budget_dense.json").read_text())
    assert res["budget"]["capacities"] == saved["budget"]["capacities"] and res["kv"] is None

    code, _, err = run_cli([*common, "--prune_method", "dense", "--kv_profile", str(budget_only),
                            "--head_scores", str(heads)], capsys)
    assert code == 2 and "give --kv_budget N" in err and len(err.strip().splitlines()) == 1
    data["kv_budget"]["capacities"] = [[4, 4, 4]] * 2  # 3 KV heads: another model's budgets
    budget_only.write_text(json.dumps(data))
    code, _, err = run_cli([*common, "--prune_method", "dense", "--kv_profile", str(budget_only)], capsys)
    assert code == 2 and "does not fit" in err and len(err.strip().splitlines()) == 1
