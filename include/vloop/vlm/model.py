"""The model layer: load a Qwen3-VL, ask it questions about images, score its answers.

One code path serves the tiny Qwen3-VL that the project builds (``vloop tiny-model``) and
Qwen/Qwen3-VL-8B-Instruct in production:

* :func:`load_model` — model + processor from a directory or a hub id, bf16 with
  ``device_map="auto"`` on a GPU, fp32 on a CPU; a directory that is not a Qwen3-VL gets a clear
  :class:`ModelLoadError`.
* :func:`generate` — batched greedy answers with per-token log-probabilities taken from the raw
  logits (before temperature and logits processors) and a :class:`Confidence` summary.
* :func:`score_answers` — teacher-forced log-probabilities of *given* answers, one forward pass
  per batch of similar lengths, logits computed for the answer positions only.
* The processor preprocesses a batch's images in one pass (:mod:`vloop.vlm.vision_inputs`, pixel-
  identical to transformers' stock processor) and the vision tower's patch embedding runs as a
  matrix product (:func:`patch_embeddings_as_matmul`).
* :func:`encode` — the chat-format batch (prompt, optional answer, labels) that training uses too.

Confidence is the geometric-mean probability of the answer's tokens, ``exp(mean log p)``, in
[0, 1], over exactly the tokens whose log-probabilities are logged (the closing ``<|im_end|>`` is
not one of them), so it can be recomputed from a record's ``token_logprobs``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from vloop.store.config import Settings
from vloop.store.images import ImageError, open_image

MAX_QUESTION_CHARS = 2000


class ModelLoadError(ValueError):
    """The path or id does not hold a Qwen3-VL model vloop can load."""


class InputError(ValueError):
    """A question or image that the model cannot be asked about."""


def _processor_class():
    from transformers import Qwen3VLProcessor

    class VloopQwen3VLProcessor(Qwen3VLProcessor):
        """Qwen3VLProcessor for images and text only.

        The stock processor insists on a video processor, which needs torchvision; vloop never
        sends video, so this subclass drops it (the attribute list comes from ``__init__``).
        """

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        def _process_images(self, images, **kwargs):
            # The whole batch at once, pixel-identical to the stock per-image path
            # (vloop.vlm.vision_inputs); the stock path for anything that one does not cover.
            from vloop.vlm.vision_inputs import preprocess_images

            processed = preprocess_images(self.image_processor, images, **kwargs)
            if processed is None:
                return super()._process_images(images, **kwargs)
            return processed, [self.replace_image_token(processed, image_idx=i) for i in range(len(images))]

    return VloopQwen3VLProcessor


def processor_class():
    """The processor class (built lazily so importing vloop.vlm.model does not import transformers)."""
    global _PROCESSOR
    if _PROCESSOR is None:
        _PROCESSOR = _processor_class()
    return _PROCESSOR


_PROCESSOR = None


@dataclass
class LoadedModel:
    model: object  # Qwen3VLForConditionalGeneration (or a PeftModel around it)
    processor: object
    name: str
    device: str
    dtype: object

    @property
    def tokenizer(self):
        return self.processor.tokenizer


def pick_device_and_dtype(device: str | None = None, dtype=None):
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return device, dtype


def check_model_dir(path: str | os.PathLike) -> dict:
    """The config of a local Qwen3-VL directory, or :class:`ModelLoadError` saying what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path} has no config.json: not a transformers model directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {e}") from None
    if cfg.get("model_type") != "qwen3_vl":
        raise ModelLoadError(f"{path} holds a {cfg.get('model_type')!r} model, not a Qwen3-VL (qwen3_vl)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelLoadError(f"{path} has a config but no weights (*.safetensors)")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if not (path / f).is_file():
            raise ModelLoadError(f"{path} has no {f}: the processor cannot be loaded")
    return cfg


def load_model(name_or_path: str | os.PathLike, *, device: str | None = None, dtype=None,
               local_files_only: bool | None = None) -> LoadedModel:
    """Load a Qwen3-VL model and its processor for inference.

    ``name_or_path`` is a local directory (loaded offline) or a hub id such as
    ``Qwen/Qwen3-VL-8B-Instruct``. On a GPU: bf16 and ``device_map="auto"``; on a CPU: fp32.
    """
    from transformers import Qwen3VLForConditionalGeneration

    name = str(name_or_path)
    is_dir = Path(name).is_dir()
    if is_dir:
        check_model_dir(name)
        local_files_only = True
    elif Path(name).exists():
        raise ModelLoadError(f"{name} is a file, not a model directory")
    elif name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelLoadError(f"{name}: no such model directory (and not a hub id like Qwen/Qwen3-VL-8B-Instruct)")
    device, dtype = pick_device_and_dtype(device, dtype)
    kwargs = dict(dtype=dtype, local_files_only=bool(local_files_only))
    if device.startswith("cuda"):
        # "cuda": spread over the visible GPUs; "cuda:N": that GPU only (training asks for one).
        kwargs["device_map"] = "auto" if device == "cuda" else {"": device}
    try:
        model = Qwen3VLForConditionalGeneration.from_pretrained(name, **kwargs)
        processor = processor_class().from_pretrained(name, local_files_only=bool(local_files_only))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load Qwen3-VL model {name!r}: {e}") from e
    if not device.startswith("cuda"):
        model.to(device)
    model.eval()
    patch_embeddings_as_matmul(model)
    return LoadedModel(model, processor, name, device, dtype)


def _patch_conv3d_class():
    import torch
    import torch.nn.functional as F

    class PatchConv3d(torch.nn.Conv3d):
        """A Conv3d whose kernel equals its stride, run as one matrix product when every input is
        exactly one kernel-sized patch (how the vision tower's patch embedding calls it).

        Same parameters and state dict as the Conv3d; same result up to float rounding (the sums
        are the same products in another order, ~1e-6 apart on the tiny model's logits). On a CPU
        it cut a batch-64 scoring forward pass of the tiny model from 128 to 100 ms (one thread):
        oneDNN's 3-D convolution is slow for what is really a (patches x 1536) @ (1536 x 96) product.
        """

        def forward(self, x):
            if x.dim() == 5 and tuple(x.shape[2:]) == tuple(self.kernel_size):
                out = F.linear(x.reshape(x.shape[0], -1), self.weight.reshape(self.out_channels, -1), self.bias)
                return out.reshape(x.shape[0], self.out_channels, 1, 1, 1)
            return super().forward(x)

    return PatchConv3d


_PATCH_CONV3D = None


def patch_embeddings_as_matmul(model) -> int:
    """Run every non-overlapping Conv3d in ``model`` (kernel == stride, no padding, dilation or
    groups: Qwen-VL's patch embedding) as a matrix product; how many were changed. The module keeps
    its identity and parameters (only its class changes), so saving, LoRA and hooks are unaffected."""
    import torch

    global _PATCH_CONV3D
    if _PATCH_CONV3D is None:
        _PATCH_CONV3D = _patch_conv3d_class()
    changed = 0
    for m in model.modules():
        if (type(m) is torch.nn.Conv3d and tuple(m.kernel_size) == tuple(m.stride) and m.groups == 1
                and tuple(m.dilation) == (1, 1, 1) and m.padding in ((0, 0, 0), 0, "valid")):
            m.__class__ = _PATCH_CONV3D
            changed += 1
    return changed


# -- inputs -----------------------------------------------------------------------------------

def check_question(question: str, max_chars: int = MAX_QUESTION_CHARS) -> str:
    if not isinstance(question, str):
        raise InputError(f"question must be text, got {type(question).__name__}")
    q = question.strip()
    if not q:
        raise InputError("question is empty")
    if len(q) > max_chars:
        raise InputError(f"question is {len(q):,} characters, over the limit of {max_chars:,}")
    return q


def as_image(image, *, max_bytes: int = Settings.max_image_bytes,
             max_pixels: int = Settings.max_image_pixels) -> Image.Image | None:
    """A PIL image in RGB from bytes, a path or a PIL image; None stays None (a text-only question)."""
    if image is None:
        return None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        try:
            image = Path(image).read_bytes()
        except OSError as e:
            raise InputError(f"cannot read image file {image}: {e.strerror}") from None
    if isinstance(image, (bytes, bytearray)):
        try:
            return open_image(bytes(image), max_bytes=max_bytes, max_pixels=max_pixels).convert("RGB")
        except ImageError as e:
            raise InputError(f"unreadable image: {e}") from None
    raise InputError(f"image must be bytes, a path or a PIL image, got {type(image).__name__}")


def messages(question: str, has_image: bool, answer: str | None = None) -> list[dict]:
    """Qwen's chat format: one user turn (image first, then text), optionally the answer."""
    content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": question}]
    msgs = [{"role": "user", "content": content}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def encode(processor, images: Sequence, questions: Sequence[str], answers: Sequence[str] | None = None,
           *, padding_side: str = "right"):
    """Tokenise a batch in chat format. With ``answers``, adds ``labels``: the answer tokens and the
    closing ``<|im_end|>``, -100 everywhere else (prompt, image tokens, padding)."""
    import torch

    if len(images) != len(questions) or (answers is not None and len(answers) != len(questions)):
        raise InputError("images, questions and answers must have the same length")
    pil = [as_image(im) for im in images]
    qs = [check_question(q) for q in questions]
    tok = processor.tokenizer
    prompts = [processor.apply_chat_template(messages(q, im is not None), add_generation_prompt=True,
                                             tokenize=False) for q, im in zip(qs, pil)]
    texts = prompts if answers is None else [p + a + tok.eos_token for p, a in zip(prompts, answers)]
    imgs = [im for im in pil if im is not None]
    tok.padding_side = padding_side
    batch = processor(text=texts, images=imgs or None, return_tensors="pt", padding=True)
    if answers is not None:
        # The chat template ends the prompt with "assistant\n" and byte-level BPE never merges
        # across a newline, so the answer's tokens are the same alone as after the prompt.
        answer_lens = [len(tok(a + tok.eos_token, add_special_tokens=False)["input_ids"]) for a in answers]
        labels = torch.full_like(batch["input_ids"], -100)
        for i, n in enumerate(answer_lens):
            real = torch.nonzero(batch["attention_mask"][i]).flatten()
            end = int(real[-1]) + 1
            labels[i, end - n:end] = batch["input_ids"][i, end - n:end]
        batch["labels"] = labels
    return batch


# -- confidence -------------------------------------------------------------------------------

@dataclass
class Confidence:
    mean_logprob: float
    min_logprob: float

    @property
    def geo_mean_prob(self) -> float:
        """exp(mean log p): the per-token probability the answer was given; vloop's confidence."""
        return math.exp(self.mean_logprob)

    @property
    def min_prob(self) -> float:
        return math.exp(self.min_logprob)

    @classmethod
    def from_logprobs(cls, logprobs: Sequence[float]) -> "Confidence":
        if len(logprobs) == 0:
            return cls(float("-inf"), float("-inf"))
        lp = np.asarray(logprobs, dtype=np.float64)
        return cls(float(lp.mean()), float(lp.min()))


@dataclass
class Generation:
    text: str
    tokens: list[str]
    token_ids: list[int]
    token_logprobs: list[float]  # of each generated token, from the raw logits
    top_logprobs: list[list[tuple[str, float]]]  # per position, the k most likely tokens
    confidence: Confidence
    prompt_tokens: int = 0  # the prompt's length in tokens (image tokens included)
    finish_reason: str = "stop"  # "length" when max_new_tokens cut the answer


def to_device(batch, lm: LoadedModel):
    import torch

    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(lm.model.device)
            if v.is_floating_point():
                v = v.to(lm.dtype)
        out[k] = v
    return out


def generate(lm: LoadedModel, images: Sequence, questions: Sequence[str], *, max_new_tokens: int = 16,
             top_logprobs: int = 0, temperature: float = 0.0, bad_words: Sequence[str] = (),
             exceptions: Sequence[str] | None = None) -> list[Generation]:
    """Answer each (image, question). Greedy unless ``temperature`` > 0. ``bad_words``: phrases
    the answers must not contain, in any tokenisation (:class:`vloop.vlm.decoding.BannedPhrases`;
    ``exceptions``: longer words that stay allowed, by default 不可能).

    Log-probabilities come from ``output_logits`` (raw logits), so they describe the model, not
    the sampling settings (nor the banned phrases).
    """
    import torch

    batch = encode(lm.processor, images, questions, padding_side="left")
    inputs = to_device(batch, lm)
    tok = lm.tokenizer
    gen_kwargs = dict(max_new_tokens=max_new_tokens, output_logits=True, return_dict_in_generate=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=temperature)
    else:
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if bad_words:
        from transformers import LogitsProcessorList

        from vloop.vlm.decoding import DEFAULT_EXCEPTIONS, BannedPhrases

        ban = BannedPhrases.for_tokenizer(tok, bad_words, DEFAULT_EXCEPTIONS if exceptions is None else exceptions)
        gen_kwargs["logits_processor"] = LogitsProcessorList([ban.at(inputs["input_ids"].shape[1])])
    with torch.inference_mode():
        out = lm.model.generate(**inputs, **gen_kwargs)
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # (batch, steps, vocab)
    results = []
    for i in range(new.shape[0]):
        ids, lps, tops = [], [], []
        for t, token_id in enumerate(new[i].tolist()):
            if token_id == tok.pad_token_id and (t == 0 or ids and ids[-1] == tok.eos_token_id):
                break
            ids.append(token_id)
            lps.append(float(logprobs[i, t, token_id]))
            if top_logprobs:
                v, ix = logprobs[i, t].topk(top_logprobs)
                tops.append([(tok.decode([j]), float(x)) for j, x in zip(ix.tolist(), v.tolist())])
            if token_id == tok.eos_token_id:
                break
        # The closing <|im_end|> is not part of the answer: not in its text, its logprobs or its
        # confidence, so confidence can always be recomputed from the logged token_logprobs.
        text_ids = [j for j in ids if j != tok.eos_token_id]
        n = len(text_ids)
        results.append(Generation(
            text=tok.decode(text_ids, skip_special_tokens=True).strip(),
            tokens=[tok.decode([j]) for j in text_ids], token_ids=text_ids,
            token_logprobs=lps[:n], top_logprobs=tops[:n], confidence=Confidence.from_logprobs(lps[:n]),
            prompt_tokens=int(inputs["attention_mask"][i].sum()),
            finish_reason="length" if len(ids) == max_new_tokens and tok.eos_token_id not in ids else "stop"))
    return results


@dataclass
class AnswerScore:
    token_logprobs: list[float]  # the answer's tokens (the closing <|im_end|> is trained on, not scored)
    confidence: Confidence


def score_answers(lm: LoadedModel, images: Sequence, questions: Sequence[str], answers: Sequence[str],
                  *, batch_size: int = 32) -> list[AnswerScore]:
    """Teacher-forced log-probability of each given answer: one forward pass per batch.

    Samples are batched by length (image size, then text length) so that a batch pads little,
    and returned in the order given. Batches are padded on the left, so every answer ends at the
    last position and the model computes logits for the last (longest answer + 1) positions only.
    """
    import torch

    if not (len(images) == len(questions) == len(answers)):
        raise InputError("images, questions and answers must have the same length")
    pil = [as_image(im) for im in images]  # decoded once: the sort needs the sizes, encode the pixels
    order = sorted(range(len(pil)), key=lambda i: (0 if pil[i] is None else pil[i].width * pil[i].height,
                                                  len(questions[i]) + len(answers[i])))
    scores: list[AnswerScore | None] = [None] * len(pil)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = encode(lm.processor, [pil[i] for i in idx], [questions[i] for i in idx], [answers[i] for i in idx],
                       padding_side="left")
        inputs = to_device(batch, lm)
        labels = inputs.pop("labels")
        # Left padding: the answer (and its closing <|im_end|>) ends every row.
        n_label = (labels != -100).sum(1)
        keep = int(n_label.max()) + 1
        with torch.inference_mode():
            logits = lm.model(**inputs, use_cache=False, logits_to_keep=keep).logits.float()
        # Position t predicts token t+1.
        target = labels[:, -keep + 1:]
        token_lp = logits[:, :-1].log_softmax(-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        rows = token_lp.cpu().tolist()
        for i, row, n in zip(idx, rows, n_label.tolist()):
            lps = row[len(row) - n:len(row) - 1]  # the answer's tokens, without the closing <|im_end|>
            scores[i] = AnswerScore(lps, Confidence.from_logprobs(lps))
    return scores


# -- evaluation helpers -----------------------------------------------------------------------

def normalise_answer(text: str) -> str:
    """For exact match: case, surrounding space and final punctuation do not count."""
    return text.strip().strip(".。!！?？").strip().lower()


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` for separating True from False labels (ties count half)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    allv = np.concatenate([pos, neg])[order]
    # Average ranks over ties.
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1] == allv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = ranks[:len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
