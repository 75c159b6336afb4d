"""Image-text calibration windows in LLaVA's own conversation format, run through the full multimodal forward.

A dataset is a JSON list (or JSON lines) of LLaVA records::

    [{"id": "000000033471", "image": "000000033471.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                        {"from": "gpt", "value": "The bus is white and red."}, ...]}, ...]

(LLaVA-Instruct-150K, LLaVA-Pretrain's BLIP captions, ShareGPT4V, or a file of your own). Sources:

    llava_instruct   hub dataset liuhaotian/LLaVA-Instruct-150K, llava_instruct_150k.json (images: COCO train2017)
    llava_pretrain   hub dataset liuhaotian/LLaVA-Pretrain, blip_laion_cc_sbu_558k.json (images: its images.zip)
    PATH.json[l]     a local file in the format above

With ``data_dir`` the two named sets are read from ``DATA_DIR/llava_instruct/llava_instruct_150k.json`` and
``DATA_DIR/llava_pretrain/blip_laion_cc_sbu_558k.json``. Images are looked up under ``image_dir`` (default: the
folder of the JSON file, then its ``images/`` subfolder); the hub sets' images are not on the hub as files,
so they always need ``image_dir``. Records without an image are skipped (the point is image tokens).

A window is one record rendered with LLaVA's ``llava_v1`` conversation template (``<system> USER: ...
ASSISTANT: ...</s>``, every turn), processed by the model's processor, which expands ``<image>`` into one
token per image feature: 576 for LLaVA-1.5 at 336 px (24 x 24 patches), for LLaVA-1.6 (anyres) 576 for the
base image plus up to 4 x 576 for the high-resolution tiles (unpadded, one newline token per row: up to 2,880
in all), 16 for the testbed's 64 px wrapper. A window is cut at ``seqlen`` tokens after its image tokens, so
windows have different lengths; each is one ``[1, L]`` batch. Each window is a ``[1, L]`` tensor of token ids
carrying the pixel inputs in ``window.mm_inputs``; :func:`lib.layerwise.batch_inputs` turns it into the
model's keyword arguments, so the one capture path runs the full multimodal forward (vision tower, projector,
image features merged into the embeddings) and the decoder-linear statistics include the image tokens.
"""
from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from typing import Any

import torch

from .data import DataError

logger = logging.getLogger(__name__)

HUB_SETS = {
    "llava_instruct": ("liuhaotian/LLaVA-Instruct-150K", "llava_instruct_150k.json"),
    "llava_pretrain": ("liuhaotian/LLaVA-Pretrain", "blip_laion_cc_sbu_558k.json"),
}
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
IMAGE_TOKEN = "<image>"


def is_image_text(name: str) -> bool:
    """Whether a --calib_dataset / --objective_dataset value names image-text data (not c4 / wikitext2)."""
    return name in HUB_SETS or name.endswith((".json", ".jsonl"))


def dataset_file(name: str, data_dir: str | None = None, cache_dir: str | None = None) -> str:
    """The conversation JSON for a dataset name (local path, ``data_dir`` layout, or a hub download)."""
    if name.endswith((".json", ".jsonl")):
        if not os.path.isfile(name):
            raise DataError(f"image-text dataset {name} does not exist")
        return name
    if name not in HUB_SETS:
        raise DataError(f"unknown image-text dataset '{name}' (choose {', '.join(HUB_SETS)} or a .json file)")
    repo, fname = HUB_SETS[name]
    if data_dir is not None:
        path = os.path.join(data_dir, name, fname)
        if not os.path.isfile(path):
            raise DataError(f"{name}: {path} not found under --data_dir")
        return path
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo, fname, repo_type="dataset", cache_dir=cache_dir)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot download {repo}/{fname} ({first}); offline nodes need --data_dir") from exc


def check_available(name: str, data_dir: str | None = None, image_dir: str | None = None) -> None:
    """Cheap checks before the model loads: the local file (or the ``data_dir`` layout) and the image folder.
    Hub sets are not probed here."""
    if name.endswith((".json", ".jsonl")) or data_dir is not None:
        dataset_file(name, data_dir)
    elif name not in HUB_SETS:
        raise DataError(f"unknown image-text dataset '{name}' (choose {', '.join(HUB_SETS)} or a .json file)")
    if image_dir is not None and not os.path.isdir(image_dir):
        raise DataError(f"--image_dir {image_dir} is not a directory")


def load_records(path: str) -> list[dict[str, Any]]:
    """Records with an image and at least one turn."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                rows = [json.loads(line) for line in f if line.strip()]
            else:
                rows = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image-text dataset {path}: {exc}") from exc
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of LLaVA conversation records")
    keep = [r for r in rows if isinstance(r, dict) and r.get("image") and r.get("conversations")]
    if not keep:
        raise DataError(f"{path}: no record with both 'image' and 'conversations'")
    return keep


def resolve_image_dir(dataset_path: str, image_dir: str | None) -> str:
    if image_dir is not None:
        if not os.path.isdir(image_dir):
            raise DataError(f"--image_dir {image_dir} is not a directory")
        return image_dir
    folder = os.path.dirname(os.path.abspath(dataset_path))
    sub = os.path.join(folder, "images")
    return sub if os.path.isdir(sub) else folder


def render(conversations: list[dict[str, str]], eos: str, system: str = SYSTEM) -> str:
    """LLaVA's llava_v1 template: system, then ``USER: q ASSISTANT: a</s>`` for every turn."""
    parts = [system]
    for turn in conversations:
        value = str(turn.get("value", "")).strip()
        if turn.get("from") in ("human", "user"):
            parts.append(f" USER: {value}")
        else:
            parts.append(f" ASSISTANT: {value}{eos}")
    text = "".join(parts)
    if IMAGE_TOKEN not in text:  # LLaVA puts the image first when a record's text does not say where
        text = text.replace("USER: ", f"USER: {IMAGE_TOKEN}\n", 1)
    return text


def _open_image(path: str):
    from PIL import Image

    try:
        return Image.open(path).convert("RGB")
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot open image {path}: {exc}") from exc


def make_window(processor, image, text: str, seqlen: int, image_token_id: int) -> torch.Tensor:
    """One ``[1, L]`` window (``L <= seqlen``), carrying ``mm_inputs`` (pixel_values, image_sizes)."""
    enc = processor(images=image, text=text, return_tensors="pt")
    ids = enc["input_ids"]
    positions = (ids[0] == image_token_id).nonzero()
    if len(positions) and int(positions[-1]) >= seqlen:
        raise DataError(f"a window holds {len(positions)} image tokens (last at {int(positions[-1])}), more than "
                        f"--seqlen {seqlen}: raise --seqlen")
    window = ids[:, :seqlen].clone()
    window.mm_inputs = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    return window


def get_image_text_calibration(name: str, processor, nsamples: int, seed: int, seqlen: int, image_token_id: int,
                               data_dir: str | None = None, image_dir: str | None = None,
                               cache_dir: str | None = None, system: str = SYSTEM) -> list[torch.Tensor]:
    """``nsamples`` windows of randomly drawn records (``random.seed(seed)``, with replacement, as Wanda draws
    c4 documents), each one conversation with its image (``system``: the template's system line)."""
    path = dataset_file(name, data_dir, cache_dir)
    records = load_records(path)
    folder = resolve_image_dir(path, image_dir)
    eos = processor.tokenizer.eos_token or ""
    random.seed(seed)
    windows = []
    for _ in range(nsamples):
        rec = records[random.randint(0, len(records) - 1)]
        img_path = os.path.join(folder, rec["image"])
        if not os.path.isfile(img_path):
            raise DataError(f"image {rec['image']} of record {rec.get('id', '?')} not found under {folder} "
                            "(--image_dir)")
        windows.append(make_window(processor, _open_image(img_path), render(rec["conversations"], eos, system), seqlen,
                                   image_token_id))
    return windows


@dataclass
class WindowStats:
    windows: int
    tokens: int
    image_tokens: int
    min_len: int
    max_len: int

    @property
    def image_share(self) -> float:
        return self.image_tokens / max(self.tokens, 1)

    def as_dict(self) -> dict[str, Any]:
        return {"windows": self.windows, "tokens": self.tokens, "image_tokens": self.image_tokens,
                "image_token_share": round(self.image_share, 4), "min_len": self.min_len, "max_len": self.max_len,
                "image_tokens_per_window": round(self.image_tokens / max(self.windows, 1), 1)}


def window_stats(windows: list[torch.Tensor], image_token_id: int) -> WindowStats:
    """Token counts of a set of windows: how many of the decoder's calibration tokens are image tokens."""
    lens = [int(w.shape[-1]) for w in windows]
    img = sum(int((w == image_token_id).sum()) for w in windows)
    return WindowStats(len(windows), sum(lens), img, min(lens, default=0), max(lens, default=0))


@torch.no_grad()
def image_text_nll(model, windows: list[torch.Tensor], device) -> tuple[float, int]:
    """Summed next-token NLL over the text tokens of image-text windows (image positions are not predicted),
    and the number of tokens scored; ``exp(sum / count)`` is the image-conditioned perplexity."""
    from .layerwise import batch_inputs

    image_id = model.config.image_token_index
    total, count = 0.0, 0
    for w in windows:
        inputs = batch_inputs(w, device)
        logits = model(**inputs, use_cache=False).logits[0, :-1].float()
        target = inputs["input_ids"][0, 1:]
        keep = target != image_id
        nll = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
        total += float(nll)
        count += int(keep.sum())
    return total, count


def conversations_from_questions(questions: str, out: str) -> str:
    """A VQA JSONL (image, question, answers) as LLaVA conversation records, one turn each with the first
    reference answer; written to ``out`` (used by the testbed benchmark and tests)."""
    rows = [json.loads(line) for line in open(questions, encoding="utf-8") if line.strip()]
    recs = [{"id": str(i), "image": r["image"],
             "conversations": [{"from": "human", "value": "<image>\n" + r["question"]},
                               {"from": "gpt", "value": r["answers"][0]}]} for i, r in enumerate(rows)]
    with open(out, "w", encoding="utf-8") as f:
        json.dump(recs, f)
    return out
