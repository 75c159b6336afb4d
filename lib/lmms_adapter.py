"""VQA-style evaluation of the in-memory (pruned, KV-quantized) LLaVA model with lmms-eval.

lmms-eval is optional (``pip install lmms-eval``; see INSTALL.md for installing it beside transformers 5.x
without letting it change torch/transformers). :class:`OptspaLmms` is a small lmms-eval model, registered as
``optspa``, that wraps the model object already in memory and its processor; nothing is reloaded from disk, so
the pruned weights and any KV quantization hooks active around :func:`evaluate` are what is measured.

Prompts use LLaVA's ``llava_v1`` template (``<system> USER: <image>\\n{question} ASSISTANT:``), as lmms-eval's
``llava`` model does for LLaVA-1.5/1.6, with greedy decoding. :func:`write_vqa_task` writes a local lmms-eval
task (YAML + utils.py) over a JSONL of ``{"image", "question", "answers"}`` rows and an image folder, scored
with VQA accuracy (lmms-eval's EvalAI answer normalisation, min(1, matches / 3) averaged over leave-one-out
subsets of the references).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

logger = logging.getLogger(__name__)

INSTALL_HINT = "--eval_lmms needs lmms-eval: pip install lmms-eval (see INSTALL.md for transformers 5.x)"
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


class LmmsUnavailable(RuntimeError):
    """lmms-eval is missing or cannot be imported; the message is one line."""


def require_lmms() -> None:
    try:
        import lmms_eval.evaluator  # noqa: F401
        import lmms_eval.api.model  # noqa: F401
    except ImportError as exc:
        raise LmmsUnavailable(f"{INSTALL_HINT} ({exc})") from exc


def prompt(question: str, n_images: int, system: str = SYSTEM) -> str:
    if "<image>" not in question and n_images:
        question = "\n".join(["<image>"] * n_images) + "\n" + question
    return f"{system} USER: {question} ASSISTANT:"


def _model_class():
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import register_model

    @register_model("optspa")
    class OptspaLmms(lmms):
        """An lmms-eval model around an in-memory LLaVA model and its processor."""

        def __init__(self, model=None, processor=None, device: str = "cpu", max_new_tokens: int = 32,
                     system: str = SYSTEM, **kwargs) -> None:
            super().__init__()
            if model is None or processor is None:
                raise ValueError("OptspaLmms wraps a model in memory: pass model= and processor=")
            self.model, self.processor, self.device = model, processor, torch.device(device)
            self.max_new_tokens, self.system = max_new_tokens, system
            self.batch_size_per_gpu = 1

        def _visuals(self, req) -> list:
            _ctx, _gen, doc_to_visual, doc_id, task, split = req.args[:6]
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
            return [v.convert("RGB") for v in (visuals or [])]

        def _inputs(self, text: str, images: list):
            enc = self.processor(images=images or None, text=text, return_tensors="pt")
            return {k: v.to(self.device) for k, v in enc.items()}

        @torch.no_grad()
        def generate_until(self, requests) -> list[str]:
            out = []
            tok = self.processor.tokenizer
            for req in requests:
                context, gen_kwargs = req.args[0], dict(req.args[1] or {})
                images = self._visuals(req)
                until = gen_kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                inputs = self._inputs(prompt(context, len(images), self.system), images)
                ids = self.model.generate(**inputs, do_sample=False, use_cache=True,
                                          max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                                          pad_token_id=tok.pad_token_id or tok.eos_token_id)
                text = tok.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                out.append(text.strip())
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), out[-1])
            return out

        @torch.no_grad()
        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            res = []
            for req in requests:
                context, continuation = req.args[0], req.args[1]
                images = self._visuals(req)
                head = prompt(context, len(images), self.system)
                full = self._inputs(head + continuation, images)
                n_head = self._inputs(head, images)["input_ids"].shape[1]
                logits = self.model(**full, use_cache=False).logits[0, n_head - 1:-1].float()
                target = full["input_ids"][0, n_head:]
                logp = torch.log_softmax(logits, -1)
                res.append((float(logp.gather(1, target[:, None]).sum()), bool((logits.argmax(-1) == target).all())))
            return res

        def generate_until_multi_round(self, requests) -> list[str]:
            raise NotImplementedError("multi-round generation is not supported by the optspa adapter")

    return OptspaLmms


def make_model(model, processor, device: str = "cpu", **kw):
    """The registered lmms-eval model wrapping ``model`` (no copy, no reload)."""
    require_lmms()
    return _model_class()(model=model, processor=processor, device=str(device), **kw)


def unknown_tasks(tasks: list[str], include_path: str | list[str] | None = None) -> list[str]:
    """The task names lmms-eval does not know (with ``include_path``'s local tasks)."""
    require_lmms()
    from lmms_eval.tasks import TaskManager

    manager = TaskManager("WARNING", include_path=include_path, model_name="optspa")
    return [t for t in tasks if t not in manager.all_tasks]


def evaluate(model, processor, tasks: list[str], device: str = "cpu", include_path: str | list[str] | None = None,
             limit: int | None = None, max_new_tokens: int = 32, system: str = SYSTEM) -> dict[str, dict[str, Any]]:
    """Run lmms-eval ``tasks`` on the in-memory model; returns {task: {metric: value}} (stderr entries dropped)."""
    require_lmms()
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    lm = make_model(model, processor, device, max_new_tokens=max_new_tokens, system=system)
    manager = TaskManager("WARNING", include_path=include_path, model_name="optspa")
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lmms-eval task(s): {', '.join(unknown)}")
    out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, bootstrap_iters=0,
                          log_samples=False, verbosity="WARNING", process_docs_parallel=1)
    results = {}
    for task, metrics in (out or {}).get("results", {}).items():
        clean = {k.split(",")[0]: v for k, v in metrics.items()
                 if "stderr" not in k and k != "alias" and isinstance(v, (int, float))}
        results[task] = clean
        logger.info("lmms-eval %s: %s", task, ", ".join(f"{k} {v:.4f}" for k, v in clean.items()))
    return results


_UTILS = '''"""Generated by Optspa (lib/lmms_adapter.py): a local VQA task over a JSONL and an image folder."""
import os

from PIL import Image

IMAGE_DIR = {image_dir!r}


def doc_to_visual(doc):
    return [Image.open(os.path.join(IMAGE_DIR, doc["image"])).convert("RGB")]


def doc_to_text(doc):
    return doc["question"] + "\\nAnswer the question using a single word or phrase."


def process_results(doc, results):
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

    norm = EvalAIAnswerProcessor()
    pred = norm(results[0])
    refs = [norm(a) for a in doc["answers"]]
    accs = []
    for i in range(len(refs)):  # VQA accuracy: min(1, matches / 3), averaged over leave-one-out subsets
        others = refs[:i] + refs[i + 1:] if len(refs) > 1 else refs
        accs.append(min(1.0, sum(a == pred for a in others) / 3.0))
    return {{"vqa_accuracy": sum(accs) / len(accs), "exact_match": float(pred in refs)}}
'''

_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answers
generation_kwargs:
  max_new_tokens: 16
  until:
    - "ASSISTANT:"
process_results: !function utils.process_results
metric_list:
  - metric: vqa_accuracy
    aggregation: mean
    higher_is_better: true
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""


def write_vqa_task(jsonl: str, image_dir: str, out_dir: str, name: str = "optspa_vqa") -> str:
    """A local lmms-eval task folder (pass it as ``include_path``) over ``jsonl`` rows ``{"image", "question",
    "answers"}``; returns the folder."""
    with open(jsonl, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                if not {"image", "question", "answers"} <= row.keys():
                    raise ValueError(f"{jsonl}:{n}: rows need image, question and answers")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "utils.py"), "w", encoding="utf-8") as f:
        f.write(_UTILS.format(image_dir=os.path.abspath(image_dir)))
    with open(os.path.join(out_dir, f"{name}.yaml"), "w", encoding="utf-8") as f:
        f.write(_YAML.format(name=name, jsonl=os.path.abspath(jsonl)))
    return out_dir
