"""Image-text grounding: does the answer depend on the image at all?

Users react to glaring errors and let subtle ones pass, so an implicit "accept" is biased towards
answers that merely sound right. No CLIP weights can be downloaded here, so the signal comes from
the served model itself: the grounding score of an answer is

    log p(answer | image, question) - log p(answer | neutral image, question)

both teacher-forced (:func:`vloop.vlm.model.score_answers`, one forward pass per batch), summed over
the answer's tokens. The neutral image is a uniform mid-grey picture of the *same size*, so the
prompt has the same number of image tokens and only the pixels differ. A score near zero or below
means the model would have said the same without looking: an accepted answer like that is worth a
person's check (:mod:`vloop.curate.selection` picks it as a separate reason).

Each answer is scored by the model version that gave it: rows answered by an adapter are scored
with that adapter (its files from the registry's lake path) applied to the base model; rows of
the bare base, or of an adapter the registry does not know, by the base.

:func:`score_rows_on_server` computes the same scores on the serving vLLM
(:mod:`vloop.vlm.scoring_client`) instead of a model in this process: an adapter's rows by the
adapter of that name loaded there, the base's by the served base. A row the server cannot score
(its prompt over the server's ``max_model_len``, its adapter known to the registry but no longer
loaded there, an unreadable image) gets no score and a logged reason, never an error.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


@dataclass
class GroundingConfig:
    batch_size: int = 32
    neutral_grey: int = 128  # the neutral image's grey level (0..255)


def neutral_like(image, grey: int = 128) -> Image.Image:
    """A uniform grey image the size of ``image`` (bytes, path or PIL image)."""
    from vloop.vlm.model import as_image

    im = as_image(image)
    return Image.new("RGB", im.size, (grey, grey, grey))


def grounding_scores(lm, images: Sequence, questions: Sequence[str], answers: Sequence[str],
                     cfg: GroundingConfig | None = None) -> list[float]:
    """The grounding score of each (image, question, answer) under ``lm`` (see the module doc)."""
    from vloop.vlm.model import as_image, score_answers

    cfg = cfg or GroundingConfig()
    pil = [as_image(im) for im in images]
    seen = score_answers(lm, pil, questions, answers, batch_size=cfg.batch_size)
    blind = score_answers(lm, [neutral_like(im, cfg.neutral_grey) for im in pil], questions, answers,
                          batch_size=cfg.batch_size)
    return [float(np.sum(a.token_logprobs) - np.sum(b.token_logprobs)) for a, b in zip(seen, blind)]


def _adapter_name(ref: str) -> str:
    return re.sub(r"\W", "_", ref)  # PEFT keeps adapters in a ModuleDict: no dots


def score_rows(lm, lake, rows, cfg: GroundingConfig | None = None) -> dict[str, float]:
    """Grounding per ``request_id`` for interaction rows (``request_id``, ``image_key``,
    ``question``, ``answer``, ``adapter``), each by the model version that answered it.

    Adapters are loaded into ``lm.model`` with PEFT for the duration of the call and unloaded
    afterwards, so ``lm`` is the bare base again when this returns."""
    from vloop.learn.registry import Registry

    cfg = cfg or GroundingConfig()
    registry = Registry(lake)
    out: dict[str, float] = {}
    peft = None  # the base with every adapter met so far loaded into it
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # The bare base first (""), before any adapter is injected into its modules.
            for ref, group in rows.groupby(rows["adapter"].fillna("").astype("str"), sort=True):
                if ref:
                    peft = _activate(lm, lake, registry, ref, peft, Path(tmp))
                if peft is None:
                    scores = _score_group(lm, lake, group, cfg)
                elif ref and peft.active_adapter == _adapter_name(ref):
                    scores = _score_group(dataclasses.replace(lm, model=peft), lake, group, cfg)
                else:  # an unknown adapter, scored by the base: adapters switched off
                    with peft.disable_adapter():
                        scores = _score_group(dataclasses.replace(lm, model=peft), lake, group, cfg)
                out.update(zip(group["request_id"], scores))
    finally:
        if peft is not None:
            peft.unload()  # takes the LoRA layers out again, without merging them
    return out


def _activate(lm, lake, registry, ref: str, peft, tmp: Path):
    """``peft`` (created on first use) with adapter ``ref`` loaded and active; unchanged, with a
    warning, when the registry or the lake cannot provide it."""
    from vloop.store.lake import fetch_files
    from vloop.learn.registry import RegistryError

    name = _adapter_name(ref)
    try:
        version = registry.get(ref)
        local = fetch_files(lake, lake.list(version.path.rstrip("/") + "/"), tmp / name)
        if peft is None:
            from peft import PeftModel

            peft = PeftModel.from_pretrained(lm.model, local, adapter_name=name)
        else:
            peft.load_adapter(local, adapter_name=name)
        peft.set_adapter(name)
        peft.eval()
    except (RegistryError, OSError, ValueError) as e:
        log.warning("answers of %s are grounded by the base model: %s", ref, e)
    return peft


def _score_group(lm, lake, group, cfg: GroundingConfig) -> list[float]:
    scores = []
    for s in range(0, len(group), cfg.batch_size):
        chunk = group.iloc[s:s + cfg.batch_size]
        images = [lake.get_bytes(k) for k in chunk["image_key"]]
        scores += grounding_scores(lm, images, chunk["question"].tolist(), chunk["answer"].tolist(), cfg)
    return scores


@dataclass
class ServerScores:
    """What :func:`score_rows_on_server` got, per ``request_id``: the answer's token log-probabilities
    with the real image, the grounding score (when asked for) and, for the rows that got neither,
    why."""
    logprobs: dict[str, list[float]]
    grounding: dict[str, float]
    failed: dict[str, str]


MAX_LOGGED_FAILURES = 20  # per call; the rest are counted in one line


def score_rows_on_server(client, lake, rows, *, grounding: bool = True, cfg: GroundingConfig | None = None,
                         chunk: int = 64) -> ServerScores:
    """Score interaction rows (``request_id``, ``image_key``, ``question``, ``answer``, ``adapter``)
    on a vLLM server (``client``: a :class:`vloop.vlm.scoring_client.ScoringClient`), each by the
    model version that answered it, and with ``grounding`` their grounding too (one more request
    per row, with the grey image). Rows are read from the lake ``chunk`` at a time.
    :class:`vloop.vlm.scoring_client.ScoringUnavailable` (the server down or broken) is raised."""
    from vloop.learn.registry import Registry, RegistryError
    from vloop.store.lake import LakeKeyNotFound
    from vloop.vlm.model import InputError, as_image
    from vloop.vlm.scoring_client import RowScoringError, ScoreRequest

    cfg = cfg or GroundingConfig()
    served = client.models()
    registry = Registry(lake)
    models: dict[str, str | None] = {}

    def model_for(ref) -> str | None:  # None: known to the registry, not loaded on the server
        ref = "" if ref is None or (isinstance(ref, float) and np.isnan(ref)) else str(ref)
        if ref not in models:
            if not ref:
                models[ref] = served.base
            elif ref in served.adapters:
                models[ref] = ref
            else:
                try:
                    registry.get(ref)
                    models[ref] = None
                    log.warning("answers of %s are not scored: it is not loaded on %s", ref, client.url)
                except RegistryError:
                    models[ref] = served.base
                    log.warning("answers of %s are scored by the base model: the registry does not know it", ref)
        return models[ref]

    out = ServerScores({}, {}, {})
    for s in range(0, len(rows), chunk):
        part = rows.iloc[s:s + chunk]
        reqs, owners = [], []  # owners[i]: (request_id, grey?)
        for rid, key, q, a, ref in zip(part["request_id"], part["image_key"], part["question"], part["answer"],
                                        part["adapter"]):
            model = model_for(ref)
            if model is None:
                out.failed[rid] = f"adapter {ref} is not loaded on the scoring server"
                continue
            try:
                image = as_image(lake.get_bytes(key)) if key is not None else None
            except (InputError, LakeKeyNotFound, OSError) as e:
                out.failed[rid] = f"image {key}: {e}"
                continue
            reqs.append(ScoreRequest(model, image, q, a))
            owners.append((rid, False))
            if grounding:
                grey = None if image is None else neutral_like(image, cfg.neutral_grey)
                reqs.append(ScoreRequest(model, grey, q, a))
                owners.append((rid, True))
        got: dict[tuple[str, bool], list[float]] = {}
        for (rid, grey), res in zip(owners, client.score(reqs)):
            if isinstance(res, RowScoringError):
                out.failed.setdefault(rid, str(res))
            else:
                got[rid, grey] = res
        for rid, grey in owners:
            if grey or rid in out.failed:
                continue
            out.logprobs[rid] = got[rid, False]
            if grounding:
                out.grounding[rid] = float(np.sum(got[rid, False]) - np.sum(got[rid, True]))
    for i, (rid, why) in enumerate(out.failed.items()):
        if i == MAX_LOGGED_FAILURES:
            log.warning("... and %d more rows not scored on %s", len(out.failed) - i, client.url)
            break
        log.warning("row %s not scored on %s: %s", rid, client.url, why)
    return out
