"""Calibration and evaluation text, exactly as the Wanda codebase draws it.

Two sources for each dataset: the Hugging Face hub through ``datasets`` (as Wanda), or local files under
``data_dir`` for offline nodes. The local layout mirrors the original file names:

    DATA_DIR/wikitext-2-raw-v1/wiki.{train,valid,test}.raw     original WikiText-2 (raw) files
    DATA_DIR/wikitext-2-v1/wiki.valid.tokens                    used for validation when wiki.valid.raw is absent
    DATA_DIR/c4/*train*.json[l][.gz]                            c4 train shard (JSON lines with "text")
    DATA_DIR/c4/*validation*.json[l][.gz]                       c4 validation shard

When no file name contains "train", the single other JSON-lines file in ``c4/`` is used as the train shard.
"""
from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import random

import torch

logger = logging.getLogger(__name__)

DATASETS = ("wikitext2", "c4")
SPLITS = ("train", "validation", "test")
# Wanda's c4 protocol: the validation text is the first 1100 documents, cut at 256 windows.
C4_VAL_DOCS = 1100
C4_VAL_WINDOWS = 256


class DataError(RuntimeError):
    """Data that cannot be found or read; the message is one line meant for the user."""


# --------------------------------------------------------------------------------------------- raw text
def wikitext_rows_from_file(path: str) -> list[str]:
    """Rows as the hub ``wikitext`` dataset has them: one per line, blank lines as "", others keep "\\n"."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file ends with a newline: no row after it
    return ["" if not line.strip() else line + "\n" for line in lines]


def _wikitext_local(data_dir: str, split: str) -> list[str]:
    short = {"train": "train", "validation": "valid", "test": "test"}[split]
    raw = os.path.join(data_dir, "wikitext-2-raw-v1", f"wiki.{short}.raw")
    if os.path.isfile(raw):
        return wikitext_rows_from_file(raw)
    tokens = os.path.join(data_dir, "wikitext-2-v1", f"wiki.{short}.tokens")
    if split == "validation" and os.path.isfile(tokens):
        logger.info("using %s for the WikiText-2 validation split (no raw validation file)", tokens)
        return wikitext_rows_from_file(tokens)
    raise DataError(f"WikiText-2 {split} split not found under --data_dir {data_dir} (expected {raw})")


def _c4_files(data_dir: str) -> tuple[list[str], list[str]]:
    folder = os.path.join(data_dir, "c4")
    files = sorted(
        f for pat in ("*.json", "*.jsonl", "*.json.gz", "*.jsonl.gz") for f in glob.glob(os.path.join(folder, pat))
    )
    val = [f for f in files if "valid" in os.path.basename(f)]
    train = [f for f in files if "train" in os.path.basename(f)]
    if not train:
        others = [f for f in files if f not in val]
        train = others if len(others) == 1 else []
    return train, val


def _read_jsonl_texts(path: str, limit: int | None = None) -> list[str]:
    opener = gzip.open if path.endswith(".gz") else open
    texts = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                texts.append(json.loads(line)["text"])
                if limit is not None and len(texts) >= limit:
                    break
    return texts


def _c4_local(data_dir: str, split: str) -> list[str]:
    train, val = _c4_files(data_dir)
    chosen = train if split == "train" else val
    if not chosen:
        raise DataError(f"c4 {split} shard not found under --data_dir {data_dir}/c4 (see lib/data.py for names)")
    return _read_jsonl_texts(chosen[0])


def _hub_error(name: str, exc: Exception) -> DataError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DataError(f"cannot load dataset {name} from the hub ({first}); offline nodes need --data_dir")


def load_texts(name: str, split: str, data_dir: str | None = None) -> list[str]:
    """The documents (c4) or rows (wikitext2) of one split."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}' (choose from {', '.join(DATASETS)})")
    if data_dir is not None:
        if not os.path.isdir(data_dir):
            raise DataError(f"--data_dir {data_dir} is not a directory")
        return _wikitext_local(data_dir, split) if name == "wikitext2" else _c4_local(data_dir, split)
    try:
        from datasets import load_dataset

        if name == "wikitext2":
            return list(load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)["text"])
        files = {
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        }
        if split not in files:
            raise DataError("c4 has no test split; use validation")
        ds = load_dataset("allenai/c4", data_files={split: files[split]}, split=split)
        return list(ds["text"])
    except DataError:
        raise
    except Exception as exc:  # datasets raises many kinds when offline; all mean "not available"
        raise _hub_error(name, exc) from exc


def check_available(name: str, split: str, data_dir: str | None) -> None:
    """Cheap existence check for local files, so bad input fails before the model loads."""
    if data_dir is None:
        return
    if not os.path.isdir(data_dir):
        raise DataError(f"--data_dir {data_dir} is not a directory")
    if name == "wikitext2":
        _wikitext_local(data_dir, split)
    else:
        train, val = _c4_files(data_dir)
        if not (train if split == "train" else val):
            raise DataError(f"c4 {split} shard not found under --data_dir {data_dir}/c4")


# --------------------------------------------------------------------------------------------- token windows
def _tokenize(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids


def get_calibration(
    name: str, tokenizer, nsamples: int, seed: int, seqlen: int, data_dir: str | None = None
) -> list[torch.Tensor]:
    """``nsamples`` random ``seqlen``-token windows, each ``[1, seqlen]``, drawn as Wanda draws them.

    c4: a random document with more than ``seqlen`` tokens, then a random window in it; wikitext2: random
    windows of the train split joined with spaces. ``random.seed(seed)`` as in Wanda, so the same seed and
    tokenizer give the same windows as the original code.
    """
    texts = load_texts(name, "train", data_dir)
    random.seed(seed)
    samples = []
    if name == "wikitext2":
        enc = _tokenize(tokenizer, " ".join(texts))
        if enc.shape[1] <= seqlen:
            raise DataError(f"wikitext2 train has {enc.shape[1]} tokens, fewer than one {seqlen}-token window")
        for _ in range(nsamples):
            i = random.randint(0, enc.shape[1] - seqlen - 1)
            samples.append(enc[:, i : i + seqlen])
        return samples
    for _ in range(nsamples):
        # Wanda retries forever; bound it so a corpus of short documents fails instead of hanging.
        for _attempt in range(20 * len(texts)):
            doc = _tokenize(tokenizer, texts[random.randint(0, len(texts) - 1)])
            if doc.shape[1] > seqlen:
                break
        else:
            raise DataError(f"no c4 document is longer than seqlen={seqlen} tokens; lower --seqlen")
        i = random.randint(0, doc.shape[1] - seqlen - 1)
        samples.append(doc[:, i : i + seqlen])
    return samples


def get_eval_tokens(name: str, tokenizer, data_dir: str | None = None, split: str = "test",
                    seqlen: int | None = None) -> torch.Tensor:
    """The evaluation text as one ``[1, N]`` tensor, Wanda's protocol.

    wikitext2: rows joined with "\\n\\n". c4 (validation only): the first 1100 documents joined with spaces,
    cut at ``256 * seqlen`` tokens.
    """
    if name == "wikitext2":
        return _tokenize(tokenizer, "\n\n".join(load_texts(name, split, data_dir)))
    if split == "test":
        split = "validation"  # c4 has no test split; Wanda reports c4 validation perplexity
    texts = load_texts(name, split, data_dir)[:C4_VAL_DOCS]
    enc = _tokenize(tokenizer, " ".join(texts))
    if seqlen is not None:
        enc = enc[:, : C4_VAL_WINDOWS * seqlen]
    return enc
