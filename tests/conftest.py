"""Tiny LLaMA and LLaVA models built from configs (random weights), saved with save_pretrained and loaded
back through the real loading path; a tiny local dataset folder in the --data_dir layout. No network."""
from __future__ import annotations

import json
import os
import random
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# Tiny models gain nothing from threads, and oversubscribed cores make torch spin.
torch.set_num_threads(1)

WORDS = ("the cat sat on a mat while model weights were pruned by rows and columns of large language models "
         "trained on web text with attention heads keys values cache bits sparsity layer decoder").split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _tokenizer(folder: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_sentence(rng, 30) for _ in range(200)], trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(folder)
    return fast


def tiny_llama_config(vocab_size: int, **kw):
    from transformers import LlamaConfig

    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=vocab_size, max_position_embeddings=64,
               bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    cfg.update(kw)
    return LlamaConfig(**cfg)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    from transformers import LlamaForCausalLM

    folder = str(tmp_path_factory.mktemp("tiny-llama"))
    tok = _tokenizer(folder)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tok)))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> str:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    folder = str(tmp_path_factory.mktemp("tiny-llava"))
    tok = _tokenizer(folder)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=tiny_llama_config(len(tok)),
                      image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg)
    model.save_pretrained(folder)
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8, image_token="<image>",
                   vision_feature_select_strategy="default").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """WikiText-2 raw files and a c4 train/validation pair, in the layout --data_dir expects."""
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(1)
    wiki = root / "wikitext-2-raw-v1"
    wiki.mkdir()
    for split, n in (("train", 60), ("valid", 10), ("test", 10)):
        lines = []
        for _ in range(n):
            lines += ["", f" = {_sentence(rng, 3)} = ", "", " " + _sentence(rng, 40) + " "]
        (wiki / f"wiki.{split}.raw").write_text("\n".join(lines) + "\n", encoding="utf-8")
    c4 = root / "c4"
    c4.mkdir()
    for name, n in (("c4-train.00000-of-01024.json", 60), ("c4-validation.00000-of-00008.json", 30)):
        with open(c4 / name, "w", encoding="utf-8") as f:
            for _ in range(n):
                f.write(json.dumps({"text": _sentence(rng, rng.randint(20, 120)), "url": "x"}) + "\n")
    return str(root)


def load_script(name: str):
    """A script of scripts/ as a module (its functions, without running its main)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run main.py in-process; returns (exit status, stdout, stderr)."""
    import main

    try:
        code = main.main(args)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
