"""Tests for lib/kvquant.py: tiny random models built from configs (no Hub, no testbed needed)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from conftest import tiny_llama_config as base_llama_config
from lib import kvcache
from lib.models import decoder_layers
from lib.profile import Profile
from lib.kvquant import (
    QUANT_BITS,
    KVQuantConfig,
    PackedQuantizedCache,
    dequantize_channel_groups,
    dequantize_token_groups,
    fake_quantize_kv,
    fp16_kv_bytes_per_token,
    kv_bytes_per_token,
    kv_memory_report,
    num_quantized_tokens,
    pack_bits,
    quantize_channel_groups,
    quantize_token_groups,
    simulate_kv_quant,
    unpack_bits,
)

VOCAB = 128
IMAGE_TOKEN = 127


def tiny_llama_config(**overrides) -> LlamaConfig:
    # wider init than the 0.02 default so that greedy decisions are not near-ties; room for long prompts
    return base_llama_config(VOCAB, max_position_embeddings=256, initializer_range=0.1, pad_token_id=None,
                             **overrides)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> LlamaForCausalLM:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(path)
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> LlavaForConditionalGeneration:
    torch.manual_seed(1)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    cfg = LlavaConfig(vision_config=vision, text_config=tiny_llama_config(), image_token_index=IMAGE_TOKEN)
    path = tmp_path_factory.mktemp("tiny_llava")
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    return LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def prompt(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, IMAGE_TOKEN, (1, n), generator=g)


def kv_like(b: int, h: int, t: int, d: int, seed: int = 0) -> torch.Tensor:
    """Random K/V-like data with a few outlier channels, as post-RoPE keys have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, t, d, generator=g)
    x[..., 1] *= 8.0
    x[..., -2] += 5.0
    return x


# ---------------------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("n", [1, 3, 5, 7, 8, 9, 13, 31, 33, 100])
def test_pack_roundtrip_and_size(bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (2, 3, n), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (2, 3, math.ceil(n * bits / 8))  # dense: no padding beyond the last byte
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_pack_dense_layout() -> None:
    assert pack_bits(torch.tensor([1, 2, 3, 4]), 6).numel() == 3  # 4 x 6 bits = 3 bytes
    assert pack_bits(torch.arange(8), 3).numel() == 3  # 8 x 3 bits = 3 bytes
    assert pack_bits(torch.arange(8), 5).numel() == 5
    assert pack_bits(torch.tensor([1, 2, 3]), 4).numel() == 2
    # little-endian bit order: code i occupies bits [6i, 6i+6)
    word = 1 | (2 << 6) | (3 << 12) | (63 << 18)
    expected = [(word >> (8 * j)) & 0xFF for j in range(3)]
    assert pack_bits(torch.tensor([1, 2, 3, 63]), 6).tolist() == expected
    with pytest.raises(ValueError):
        pack_bits(torch.zeros(4), 7)
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(4, dtype=torch.uint8), 6, 4)  # 4 codes need 3 bytes


# ---------------------------------------------------------------------------------------------------- quantizer
@pytest.mark.parametrize("bits", QUANT_BITS)
def test_quant_error_bounded_by_half_scale(bits: int) -> None:
    x = kv_like(2, 2, 64, 32, seed=bits)
    q = quantize_token_groups(x, bits, group_size=16)
    assert q.scale.dtype == torch.float16 and q.zero.dtype == torch.float16
    assert q.scale.shape == (2, 2, 64, 2) and int(q.codes.max()) <= 2**bits - 1
    err = (dequantize_token_groups(q, torch.float32) - x).abs().unflatten(-1, (2, 16))
    bound = q.scale.float().unsqueeze(-1) / 2
    assert (err <= bound * (1 + 1e-4) + 1e-6).all()

    qc = quantize_channel_groups(x, bits, token_group_size=32)
    assert qc.scale.shape == (2, 2, 2, 32)
    errc = (dequantize_channel_groups(qc, torch.float32) - x).abs().unflatten(-2, (2, 32))
    boundc = qc.scale.float().unsqueeze(-2) / 2
    assert (errc <= boundc * (1 + 1e-4) + 1e-6).all()


def test_8bit_error_much_smaller_than_4bit() -> None:
    x = kv_like(1, 2, 64, 32, seed=3)
    cfg = KVQuantConfig.uniform(8, 1, token_group_size=32)
    mse = {}
    for bits in (4, 8):
        k, v = fake_quantize_kv(x, x, bits, bits, cfg)
        mse[bits] = ((k - x) ** 2).mean().item() + ((v - x) ** 2).mean().item()
    assert 0 < mse[8] < mse[4] / 100  # ideal ratio is (15/255)^2 ~ 1/289


def test_constant_group_is_exact_enough() -> None:
    x = torch.full((1, 1, 4, 8), 0.3)
    q = quantize_token_groups(x, 4, 8)
    assert torch.allclose(dequantize_token_groups(q, torch.float32), x, atol=1e-3)


def test_16_bits_is_identity(llama) -> None:
    x = kv_like(1, 2, 40, 16)
    cfg = KVQuantConfig.uniform(16, 2, group_size=16)
    k, v = fake_quantize_kv(x, x, 16, 16, cfg)
    assert k is x and v is x
    ids = prompt(24)
    with torch.no_grad():
        ref = llama(ids, use_cache=False).logits
        with simulate_kv_quant(llama, cfg):
            out = llama(ids, use_cache=False).logits
    assert torch.equal(ref, out)
    cache = PackedQuantizedCache.for_model(llama, cfg)
    ref_gen = llama.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(llama.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False), ref_gen)


def test_token_rule() -> None:
    assert num_quantized_tokens(10, 0) == 10
    assert num_quantized_tokens(10, 4) == 6
    assert num_quantized_tokens(3, 4) == 0
    assert num_quantized_tokens(70, 0, 32) == 64
    assert num_quantized_tokens(70, 7, 32) == 32  # group [32, 64) is not yet older than the 7 newest
    assert num_quantized_tokens(71, 7, 32) == 64
    x = kv_like(1, 2, 45, 16)
    cfg = KVQuantConfig.uniform(4, 1, group_size=8, token_group_size=16, residual=5)
    k, v = fake_quantize_kv(x, x, 4, 4, cfg)
    assert torch.equal(k[..., 32:, :], x[..., 32:, :]) and not torch.equal(k[..., :32, :], x[..., :32, :])
    assert torch.equal(v[..., 40:, :], x[..., 40:, :]) and not torch.equal(v[..., 39:40, :], x[..., 39:40, :])


# ---------------------------------------------------------------------------------------------------- real cache
@pytest.mark.parametrize("scheme", ["kivi", "per_token"])
@pytest.mark.parametrize("residual", [0, 5])
@pytest.mark.parametrize("keep_dequantized", [True, False])
def test_real_cache_matches_simulation(scheme: str, residual: int, keep_dequantized: bool, monkeypatch) -> None:
    monkeypatch.setattr(kvcache, "_SEGMENT_ROWS", 4)  # exercise multi-segment storage on short sequences
    cfg = KVQuantConfig(key_bits=[4, 6, 16], value_bits=[3, 8, 2], group_size=8, token_group_size=8,
                        residual=residual, scheme=scheme)
    cfg.validate(3, 16)
    cache = PackedQuantizedCache(cfg, keep_dequantized=keep_dequantized)
    keys, values = kv_like(2, 2, 50, 16, seed=1), kv_like(2, 2, 50, 16, seed=2)
    steps = [13, 1, 1, 5] + [1] * 30
    seen = 0
    for t in steps:
        for layer in range(3):
            k_out, v_out = cache.update(keys[..., seen : seen + t, :], values[..., seen : seen + t, :], layer)
            k_ref, v_ref = fake_quantize_kv(keys[..., : seen + t, :], values[..., : seen + t, :],
                                            *cfg.layer_bits(layer), cfg)
            assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)
        seen += t
    assert cache.get_seq_length() == seen
    # the packed storage (unpacked + scale/zero) dequantizes to what was returned
    for idx in range(2):
        layer = cache.layers[idx]
        k_ref, v_ref = fake_quantize_kv(keys[..., :seen, :], values[..., :seen, :], *cfg.layer_bits(idx), cfg)
        for stream, ref in ((layer.key_stream, k_ref), (layer.value_stream, v_ref)):
            n = stream.n_quant
            assert n > 0 and torch.equal(stream.dequantize_stored(torch.float32), ref[..., :n, :])
    assert cache.nbytes() == cache.storage_nbytes()


@pytest.mark.parametrize("keep_dequantized", [True, False])
def test_reorder_cache_for_beams(keep_dequantized: bool) -> None:
    cfg = KVQuantConfig.uniform(4, 1, group_size=8, token_group_size=8, residual=3)
    cache = PackedQuantizedCache(cfg, keep_dequantized=keep_dequantized)
    k, v = kv_like(2, 2, 30, 16, seed=4), kv_like(2, 2, 30, 16, seed=5)
    cache.update(k[..., :29, :], v[..., :29, :], 0)
    cache.reorder_cache(torch.tensor([1, 1]))
    k_out, v_out = cache.update(k[..., 29:, :], v[..., 29:, :], 0)
    # tokens before the reorder come from beam 1 for both rows; the new token keeps its own row
    k_ref, v_ref = fake_quantize_kv(k[[1, 1], :, :29], v[[1, 1], :, :29], 4, 4, cfg)
    assert torch.equal(k_out[..., :24, :], k_ref[..., :24, :]) and torch.equal(v_out[..., :26, :], v_ref[..., :26, :])
    assert torch.equal(k_out[:, :, 29], k[:, :, 29])


def test_nbytes_accounting_and_ratio() -> None:
    d, heads, layers = 32, 2, 4
    fp16 = fp16_kv_bytes_per_token(layers, heads, d)
    for bits, bound in ((8, 0.55), (6, 0.43)):
        cfg = KVQuantConfig.uniform(bits, layers)  # defaults: group 32, token group 64, residual 0
        cache = PackedQuantizedCache(cfg, keep_dequantized=True)
        x = kv_like(1, heads, 128, d)
        for layer in range(layers):
            cache.update(x, x, layer)
        stored = cache.stored_tensors()
        assert cache.nbytes() == sum(t.numel() * t.element_size() for t in stored) == cache.storage_nbytes()
        assert all(t.dtype in (torch.uint8, torch.float16, torch.float32) for t in stored)
        expected = kv_bytes_per_token(cfg, heads, d)
        assert cache.bytes_per_token() == pytest.approx(expected)
        # codes + fp16 scale/zero: keys D*b/8 + 4*D/64, values D*b/8 + 4*D/32, per head and layer
        assert expected == pytest.approx(layers * heads * (2 * d * bits / 8 + 4 * d / 64 + 4 * d / 32))
        assert cache.bytes_per_token() / fp16 <= bound
        assert cache.workspace_nbytes() > 0
    # the residual window is held in the model dtype and counted
    cfg = KVQuantConfig.uniform(8, layers, residual=16)
    cache = PackedQuantizedCache(cfg, keep_dequantized=False)
    x = kv_like(1, heads, 128, d)
    for layer in range(layers):
        cache.update(x, x, layer)
    # keys: 64 quantized (group [64,128) is not older than the 16 newest), values: 112 quantized
    key_b = 64 * d + 4 * d + 64 * d * 4
    val_b = 112 * d + 112 * 4 * (d // 32) + 16 * d * 4
    assert cache.nbytes() == layers * heads * (key_b + val_b) == cache.storage_nbytes()
    assert cache.workspace_nbytes() == 0


def test_half_half_profile_ratio() -> None:
    cfg = KVQuantConfig.half_half(8, 6, 8)
    assert cfg.key_bits == [8, 8, 8, 8, 6, 6, 6, 6]
    assert kv_bytes_per_token(cfg, 2, 32) / fp16_kv_bytes_per_token(8, 2, 32) <= 0.5


# ---------------------------------------------------------------------------------------------------- models
def test_greedy_generation_agrees_with_simulation(llama) -> None:
    cfg = KVQuantConfig.uniform(4, 2, group_size=8, token_group_size=8, residual=4)
    ids = prompt(21, seed=3)  # smallest top-2 logit margin over the 12 steps is ~2x the largest sim/real gap
    new = 12
    dense = llama.generate(ids, max_new_tokens=new, do_sample=False)
    cache = PackedQuantizedCache.for_model(llama, cfg)
    out = llama.generate(ids, past_key_values=cache, max_new_tokens=new, do_sample=False)
    assert cache.get_seq_length() == ids.shape[1] + new - 1
    with torch.no_grad(), simulate_kv_quant(llama, cfg):
        for t in range(ids.shape[1], ids.shape[1] + new):
            logits = llama(out[:, :t], use_cache=False).logits[0, -1]
            assert int(logits.argmax()) == int(out[0, t]), f"step {t}"
        # generation under the hooks wraps the DynamicCache: same rule at every step, same tokens
        sim_gen = llama.generate(ids, max_new_tokens=new, do_sample=False)
    assert torch.equal(sim_gen, out)
    assert not torch.equal(dense, out)  # 4-bit KV does change the greedy continuation here

    # real-cache step logits equal those of the hooked DynamicCache path (same K/V at every step)
    real = PackedQuantizedCache.for_model(llama, cfg)
    with torch.no_grad():
        a = llama(out[:, :25], past_key_values=real, use_cache=True).logits
        b_cache = DynamicCache(config=llama.config)
        with simulate_kv_quant(llama, cfg):
            b = llama(out[:, :25], past_key_values=b_cache, use_cache=True).logits
            for t in range(25, 30):
                a = llama(out[:, t : t + 1], past_key_values=real, use_cache=True).logits
                b = llama(out[:, t : t + 1], past_key_values=b_cache, use_cache=True).logits
                assert torch.allclose(a, b, atol=1e-5)


def test_hooks_leave_a_real_quantized_cache_alone(llama) -> None:
    cfg = KVQuantConfig.uniform(4, 2, group_size=8, token_group_size=8)
    ids = prompt(20, seed=3)
    ref = llama.generate(ids, past_key_values=PackedQuantizedCache.for_model(llama, cfg), max_new_tokens=6,
                         do_sample=False)
    with simulate_kv_quant(llama, cfg):  # must not quantize twice
        out = llama.generate(ids, past_key_values=PackedQuantizedCache.for_model(llama, cfg), max_new_tokens=6,
                             do_sample=False)
    assert torch.equal(out, ref)


def test_hooks_change_outputs_and_are_removed(llama) -> None:
    ids = prompt(40)
    cfg = KVQuantConfig.uniform(3, 2, group_size=8, token_group_size=8)
    attns = [layer.self_attn for layer in decoder_layers(llama)]
    with torch.no_grad():
        ref = llama(ids, use_cache=False).logits
        with simulate_kv_quant(llama, cfg):
            assert all(len(a._forward_pre_hooks) == 1 for a in attns)
            quant = llama(ids, use_cache=False).logits
            # use_cache=True builds a DynamicCache; the hooks must still quantize, identically
            quant_cached = llama(ids, use_cache=True).logits
        assert not torch.allclose(ref, quant, atol=1e-4)
        assert torch.equal(quant, quant_cached)
        assert all(len(a._forward_pre_hooks) == 0 for a in attns)
        assert torch.equal(llama(ids, use_cache=False).logits, ref)
        with pytest.raises(RuntimeError, match="boom"), simulate_kv_quant(llama, cfg):
            raise RuntimeError("boom")
        assert all(len(a._forward_pre_hooks) == 0 for a in attns)
        assert torch.equal(llama(ids, use_cache=False).logits, ref)


def test_layerwise_calls_are_quantized(llama) -> None:
    """A runner that calls decoder layers one by one with captured kwargs gets the same result."""
    ids = prompt(32)
    cfg = KVQuantConfig.uniform(4, 2, group_size=8, token_group_size=8)
    layer0 = decoder_layers(llama)[0]
    captured: dict = {}

    def grab(module, args, kwargs, output):
        captured.update(args=args, kwargs=dict(kwargs), output=output)

    with torch.no_grad():
        handle = layer0.register_forward_hook(grab, with_kwargs=True)
        try:
            with simulate_kv_quant(llama, cfg):
                llama(ids, use_cache=False)
        finally:
            handle.remove()
        sim_out = captured["output"]
        hidden, kwargs = captured["args"][0], captured["kwargs"]
        plain = layer0(hidden, **kwargs)
        with simulate_kv_quant(llama, cfg):
            direct = layer0(hidden, **kwargs)
    out0 = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731
    assert torch.equal(out0(direct), out0(sim_out))
    assert not torch.allclose(out0(plain), out0(direct), atol=1e-5)


def test_llava_generate_with_image(llava) -> None:
    cfg = KVQuantConfig.uniform(4, 2, group_size=8, token_group_size=8, residual=2)
    assert decoder_layers(llava) is llava.model.language_model.layers
    # default feature strategy drops CLS: (32 / 8)^2 = 16 image tokens
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, 16), IMAGE_TOKEN), prompt(6)], dim=1)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cache = PackedQuantizedCache.for_model(llava, cfg)
    out = llava.generate(input_ids=ids, pixel_values=pixels, past_key_values=cache, max_new_tokens=6,
                         do_sample=False)
    assert out.shape[1] == ids.shape[1] + 6
    assert cache.get_seq_length() == ids.shape[1] + 5 and cache.nbytes() == cache.storage_nbytes() > 0
    with simulate_kv_quant(llava, cfg):
        sim = llava.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=6, do_sample=False)
    assert torch.equal(sim, out)
    with torch.no_grad():
        ref = llava(input_ids=ids, pixel_values=pixels, use_cache=False).logits
        with simulate_kv_quant(llava, cfg):
            q = llava(input_ids=ids, pixel_values=pixels, use_cache=False).logits
    assert not torch.allclose(ref, q, atol=1e-5)
    assert all(len(l.self_attn._forward_pre_hooks) == 0 for l in llava.model.language_model.layers)


# ---------------------------------------------------------------------------------------------------- config
def test_bad_configs_raise(llama) -> None:
    with pytest.raises(ValueError, match="not supported"):
        KVQuantConfig.uniform(7, 2).validate(2, 16)
    with pytest.raises(ValueError, match="not supported"):
        KVQuantConfig(key_bits=[8, 8], value_bits=[8, 1]).validate(2, 16)
    with pytest.raises(ValueError, match="decoder layers"):
        KVQuantConfig.uniform(8, 3).validate(2, 16)
    with pytest.raises(ValueError, match="divide head_dim"):
        KVQuantConfig.uniform(8, 2, group_size=12).validate(2, 16)
    with pytest.raises(ValueError, match="scheme"):
        KVQuantConfig.uniform(8, 2, scheme="kvquant").validate(2, 16)
    with pytest.raises(ValueError, match="decoder layers"), simulate_kv_quant(llama, KVQuantConfig.uniform(8, 5)):
        pass
    with pytest.raises(ValueError):
        PackedQuantizedCache.for_model(llama, KVQuantConfig.uniform(8, 2, group_size=32))  # head_dim 16
    with pytest.raises(ValueError):
        KVQuantConfig.from_profile("8x3,q")


def test_profiles_and_cli(tmp_path, llama) -> None:
    assert KVQuantConfig.from_profile("8x2,6x2").key_bits == [8, 8, 6, 6]
    cfg = KVQuantConfig.from_profile("4/2x3")
    assert cfg.key_bits == [4, 4, 4] and cfg.value_bits == [2, 2, 2]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(Profile(num_layers=2, key_bits=[8, 6], value_bits=[6, 4]).to_dict()))
    cfg = KVQuantConfig.from_profile(str(path), num_layers=2, group_size=16, residual=8)
    assert cfg.key_bits == [8, 6] and cfg.value_bits == [6, 4] and cfg.residual == 8 and cfg.group_size == 16
    no_kv = tmp_path / "sparsity_only.json"
    no_kv.write_text(json.dumps(Profile.uniform(2, 0.5).to_dict()))
    with pytest.raises(ValueError, match="no KV bits"):
        KVQuantConfig.from_profile(str(no_kv), num_layers=2)
    assert KVQuantConfig.from_cli(2, kv_bits=16) is None
    assert KVQuantConfig.from_cli(2) is None
    assert KVQuantConfig.from_cli(2, kv_bits=6, group_size=16).key_bits == [6, 6]
    with pytest.raises(ValueError):
        KVQuantConfig.from_cli(3, kv_profile="8x2")
    rep = kv_memory_report(KVQuantConfig.uniform(8, 2, group_size=16), llama)
    assert rep["fp16_bytes_per_token"] == 2 * 2 * 2 * 2 * 16 and 0.5 < rep["ratio_to_fp16"] < 0.65
    assert kv_memory_report(None, llama)["ratio_to_fp16"] == 1.0
