"""The local model backend: one base Qwen3-VL, any number of LoRA adapters, one worker thread.

:class:`LocalEngine` owns the model and its adapter state (like vLLM's ``serving_models``): every
generation and every adapter load/unload runs on its single worker thread, so switching adapters
can never race a generation. Requests that arrive together are batched, grouped by adapter and
sampling settings, so concurrent requests for different adapters are each answered by their own.

:class:`UpstreamEngine` forwards to any OpenAI-compatible server instead (e.g. vLLM started with
``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import shutil
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

log = logging.getLogger(__name__)
JSON_HEADERS = {"Content-Type": "application/json"}


class EngineError(Exception):
    """An error with an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class GenRequest:
    image: object  # PIL image or None
    question: str
    adapter: str | None  # None: the bare base model
    max_tokens: int = 64
    temperature: float = 0.0
    top_logprobs: int = 0
    # Phrases the answer must not contain (the lake's decoding policy and the request's own
    # bad_words), sorted so equal sets share one cached index; and the longer words that stay
    # allowed (the policy's exceptions, e.g. 不可能).
    bad_words: tuple[str, ...] = ()
    exceptions: tuple[str, ...] = ()
    future: Future = field(default_factory=Future)


@dataclass
class GenResult:
    text: str
    tokens: list[str]
    token_ids: list[int]
    token_logprobs: list[float]
    top_logprobs: list[list[tuple[str, float]]]
    confidence: float
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"  # "length" when max_tokens cut the answer


class LocalEngine:
    def __init__(self, model_path: str, *, max_batch: int = 16, batch_wait_s: float = 0.005,
                 adapter_cache: Path | None = None, lake=None):
        from vloop.vlm.model import load_model

        self.lm = load_model(model_path)
        self.base_name = Path(model_path).name if Path(model_path).is_dir() else model_path
        self.base_path = str(model_path)
        self.adapters: dict[str, str] = {}  # name -> source path or lake key
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.adapter_cache = Path(adapter_cache) if adapter_cache else None
        self.lake = lake
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="engine", daemon=True)
        self._worker.start()

    # -- public API (any thread) ----------------------------------------------------------
    def submit(self, req: GenRequest) -> Future:
        from vloop.vlm.model import InputError, check_question

        if req.adapter is not None and req.adapter not in self.adapters:
            raise EngineError(404, f"model {req.adapter!r} does not exist; see GET /v1/models")
        try:  # refused here, alone, rather than inside a batch of other requests
            check_question(req.question)
        except InputError as e:
            raise EngineError(400, str(e)) from None
        self._queue.put(("gen", req))
        return req.future

    def load_adapter(self, name: str, path: str) -> None:
        return self._control("load", name, path)

    def unload_adapter(self, name: str) -> None:
        return self._control("unload", name, None)

    def models(self) -> list[dict]:
        now = int(time.time())
        out = [{"id": self.base_name, "object": "model", "created": now, "owned_by": "vloop",
                "root": self.base_path, "parent": None}]
        out += [{"id": n, "object": "model", "created": now, "owned_by": "vloop", "root": p,
                 "parent": self.base_name} for n, p in sorted(self.adapters.items())]
        return out

    def text_pieces(self, result: GenResult) -> list[str]:
        """The answer's text cut at its tokens, for streaming: piece i is what token i adds, so
        the pieces join to exactly ``result.text``. A token that ends inside a multi-byte
        character adds nothing; the character arrives with the token that completes it."""
        import os.path

        tok = self.lm.tokenizer
        pieces, sent = [], ""
        for k in range(1, len(result.token_ids) + 1):
            prefix = tok.decode(result.token_ids[:k], skip_special_tokens=True).lstrip()
            upto = os.path.commonprefix([prefix, result.text])  # never past the final text
            pieces.append(upto[len(sent):] if len(upto) > len(sent) else "")
            sent = max(sent, upto, key=len)
        if pieces:
            pieces[-1] += result.text[len(sent):]
        return pieces

    def close(self) -> None:
        self._stop.set()
        self._queue.put(("stop", None))
        self._worker.join(timeout=10)

    # -- worker -----------------------------------------------------------------------------
    def _control(self, op, name, path):
        fut: Future = Future()
        self._queue.put((op, (name, path, fut)))
        return fut.result()

    def _run(self) -> None:
        while not self._stop.is_set():
            kind, item = self._queue.get()
            if kind == "stop":
                return
            if kind in ("load", "unload"):
                name, path, fut = item
                try:
                    fut.set_result(self._do_load(name, path) if kind == "load" else self._do_unload(name))
                except Exception as e:
                    fut.set_exception(e)
                continue
            batch = [item]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch:  # gather what arrives together
                try:
                    kind2, item2 = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if kind2 != "gen":
                    self._queue.put((kind2, item2))  # controls run after this batch
                    break
                batch.append(item2)
            self._generate(batch)

    def _generate(self, batch: list[GenRequest]) -> None:
        groups: dict[tuple, list[GenRequest]] = {}
        for r in batch:
            # The banned-phrase processor applies to the whole batch, so requests with their own
            # bad_words are generated apart from those without (usually all share the policy's).
            groups.setdefault((r.adapter, r.max_tokens, r.temperature, r.top_logprobs, r.bad_words, r.exceptions),
                              []).append(r)
        for (adapter, max_tokens, temperature, top_k, bad_words, exceptions), reqs in groups.items():
            reqs = [r for r in reqs if r.future.set_running_or_notify_cancel()]
            if not reqs:
                continue
            if adapter is not None and adapter not in self.adapters:
                for r in reqs:
                    r.future.set_exception(EngineError(404, f"model {adapter!r} was unloaded"))
                continue
            self._generate_group(reqs, adapter, dict(max_new_tokens=max_tokens, top_logprobs=top_k,
                                                     temperature=temperature, bad_words=bad_words,
                                                     exceptions=exceptions))

    def _generate_group(self, reqs: list[GenRequest], adapter: str | None, kw: dict) -> None:
        """Answer ``reqs`` in one forward batch. If the batch fails it is split in halves and each
        half tried again, so one bad request fails alone and never takes other users' requests
        down with it (a failure that is not any one request's fails each of them in turn)."""
        from vloop.vlm.model import InputError, generate

        try:
            with self._adapter(adapter):
                # the index of each tokenizer and phrase is cached (vloop.vlm.decoding)
                gens = generate(self.lm, [r.image for r in reqs], [r.question for r in reqs], **kw)
        except Exception as e:
            if len(reqs) > 1:
                log.warning("a batch of %d failed (%r); splitting it to isolate the cause", len(reqs), e)
                half = len(reqs) // 2
                self._generate_group(reqs[:half], adapter, kw)
                self._generate_group(reqs[half:], adapter, kw)
                return
            if isinstance(e, InputError):  # the request's own input: a 400, not a model failure
                e = EngineError(400, str(e))
            reqs[0].future.set_exception(e)
            return
        for r, g in zip(reqs, gens):
            r.future.set_result(GenResult(
                g.text, g.tokens, g.token_ids, g.token_logprobs, g.top_logprobs, g.confidence.geo_mean_prob,
                # Generated tokens, the closing stop token included (as vLLM counts).
                prompt_tokens=g.prompt_tokens, completion_tokens=len(g.token_ids) + (g.finish_reason == "stop"),
                finish_reason=g.finish_reason))

    def _adapter(self, name: str | None):
        """Context: the model answers with adapter ``name`` (None: adapters disabled)."""
        import contextlib

        model = self.lm.model
        if not self.adapters:
            return contextlib.nullcontext()
        if name is None:
            return model.disable_adapter()
        model.set_adapter(name)
        return contextlib.nullcontext()

    def _resolve(self, name: str, path: str) -> Path:
        local = Path(path)
        if local.is_dir():
            return local
        if self.lake is not None and not path.startswith("/"):
            keys = self.lake.list(path.rstrip("/") + "/")
            if keys and self.adapter_cache is not None:
                from vloop.store.lake import fetch_files

                dest = self.adapter_cache / name
                shutil.rmtree(dest, ignore_errors=True)
                return fetch_files(self.lake, keys, dest)
        raise EngineError(400, f"lora_path {path!r} is neither a local directory nor an adapter in the lake")

    def _check(self, name: str, path: Path) -> None:
        from peft import LoraConfig

        if not (path / "adapter_config.json").is_file():
            raise EngineError(400, f"{path} has no adapter_config.json: not a PEFT adapter")
        if not any((path / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
            raise EngineError(400, f"{path} has no adapter weights (adapter_model.safetensors)")
        try:
            cfg = LoraConfig.from_pretrained(str(path))
        except Exception as e:
            raise EngineError(400, f"adapter_config.json does not parse as a LoRA config: {e}") from None
        base = cfg.base_model_name_or_path
        if base and Path(base).name != Path(self.base_path).name and base != self.base_path:
            raise EngineError(400, f"adapter {name!r} was trained on {base!r}, but this server serves "
                                   f"{self.base_path!r}")

    def _do_load(self, name: str, path: str) -> None:
        from peft import PeftModel

        if not name or name == self.base_name:
            raise EngineError(400, f"invalid lora_name {name!r}")
        if name in self.adapters:
            raise EngineError(400, f"adapter {name!r} is already loaded; unload it first")
        src = self._resolve(name, path)
        self._check(name, src)
        model = self.lm.model
        try:
            if isinstance(model, PeftModel):
                model.load_adapter(str(src), adapter_name=name)
            else:
                self.lm.model = PeftModel.from_pretrained(model, str(src), adapter_name=name)
            self.lm.model.eval()
        except Exception as e:
            # Leave every previously loaded adapter serving: drop whatever half-loaded.
            if isinstance(self.lm.model, PeftModel) and name in self.lm.model.peft_config:
                self.lm.model.delete_adapter(name)
            raise EngineError(400, f"adapter {name!r} does not fit the base model: {e}") from None
        self.adapters[name] = path
        log.info("loaded adapter %s from %s", name, path)

    def _do_unload(self, name: str) -> None:
        if name not in self.adapters:
            raise EngineError(404, f"adapter {name!r} is not loaded")
        model = self.lm.model
        if len(self.adapters) == 1:
            self.lm.model = model.unload()  # back to the plain base model
        else:
            model.delete_adapter(name)
        del self.adapters[name]
        log.info("unloaded adapter %s", name)


class UpstreamEngine:
    """Forwards chat and adapter calls to an OpenAI-compatible server (vLLM in production).

    Async end to end over one pooled keep-alive aiohttp session (an httpx client cost ~0.7 ms of
    CPU per 200 KB photo request here, aiohttp ~0.1 ms: bench/gateway_overhead.py). The base
    model's id is the upstream's own (its ``/v1/models`` entry without a parent), whatever the
    gateway was started with: vLLM answers 404 to any other name."""

    def __init__(self, url: str, *, timeout_s: float = 120.0, api_key: str | None = None):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self.base_name = None
        self._session = None  # made in the serving event loop, on first use

    def session(self):
        import aiohttp

        if self._session is None or self._session.closed:
            # No total deadline (a long stream is fine); a silent upstream fails after timeout_s.
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s, sock_read=self.timeout_s)
            self._session = aiohttp.ClientSession(
                headers=self.headers, timeout=timeout, raise_for_status=False,
                connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=30))
        return self._session

    async def models(self) -> list[dict]:
        return (await self._call("GET", "/v1/models"))["data"]

    async def resolve_base(self) -> str:
        """The upstream's base model id, asked once and remembered (a restarted upstream that
        renamed its base is picked up again by :meth:`forget_base`)."""
        if self.base_name is None:
            bases = [m["id"] for m in await self.models() if not m.get("parent")]
            if len(bases) != 1:
                raise EngineError(502, f"upstream {self.url} lists {len(bases)} base models ({bases}); "
                                       "the gateway fronts exactly one")
            self.base_name = bases[0]
            log.info("upstream %s serves base model %r", self.url, self.base_name)
        return self.base_name

    def forget_base(self) -> None:
        self.base_name = None

    async def chat(self, body: dict) -> dict:
        return await self._call("POST", "/v1/chat/completions", body)

    async def open_stream(self, body: dict) -> "UpstreamStream":
        """Start a streamed chat completion. Errors the upstream answers before its first event
        (unknown model, bad parameters) raise here, so the client still gets a plain 4xx; the
        returned stream is read with :meth:`events` and must be closed by the caller."""
        r = await self._send("POST", "/v1/chat/completions", {**body, "stream": True})
        if r.status >= 400:
            try:
                raise self._status_error(r.status, await r.read())
            finally:
                r.release()
        return UpstreamStream(r)

    @staticmethod
    async def events(stream: "UpstreamStream"):
        """The JSON events of a server-sent event stream, up to ``data: [DONE]``. An error event
        (vLLM sends one when generation fails midway) raises :class:`EngineError`."""
        import aiohttp

        try:
            async for raw in stream.response.content:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event names
                data = line[5:].strip()
                if data == "[DONE]":
                    stream.done = True
                    return
                event = json.loads(data)
                if "error" in event and "choices" not in event:
                    err = event["error"]
                    raise EngineError(502, f"upstream: {err.get('message', err) if isinstance(err, dict) else err}")
                yield event
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise EngineError(502, f"upstream stream broke off: {e!r}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EngineError(502, f"upstream sent an event that is not JSON: {e}") from None

    async def load_adapter(self, name: str, path: str) -> None:
        await self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}, raw=True)

    async def unload_adapter(self, name: str) -> None:
        await self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name}, raw=True)

    async def _send(self, method: str, path: str, body: dict | None = None):
        """The upstream's response (headers read, body not yet). A keep-alive connection the
        upstream closed while idle is retried once on a fresh one; nothing was logged yet."""
        import aiohttp

        data = None if body is None else msgspec.json.encode(body)  # ~7x json.dumps on a photo request
        for attempt in (1, 2):
            try:
                return await self.session().request(method, self.url + path, data=data,
                                                     headers=JSON_HEADERS if data is not None else None)
            except aiohttp.ServerDisconnectedError as e:
                if attempt == 2:
                    raise EngineError(502, f"upstream {self.url} unreachable: {e!r}") from None
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                raise EngineError(502, f"upstream {self.url} unreachable: {e!r}") from None

    async def _call(self, method: str, path: str, body: dict | None = None, raw: bool = False):
        import aiohttp

        r = await self._send(method, path, body)
        try:
            content = await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise EngineError(502, f"upstream {self.url} broke off its answer to {path}: {e!r}") from None
        finally:
            r.release()
        if r.status >= 400:
            raise self._status_error(r.status, content)
        if raw:
            return content.decode("utf-8", "replace")
        try:
            return msgspec.json.decode(content)
        except msgspec.DecodeError:
            raise EngineError(502, f"upstream {self.url} answered {path} with something that is not JSON") from None

    @staticmethod
    def _status_error(status: int, content: bytes) -> EngineError:
        text = content.decode("utf-8", "replace")
        try:
            body = json.loads(text)
            err = body.get("error", {})
            msg = (err.get("message") if isinstance(err, dict) else err) or body.get("message") or text
        except (json.JSONDecodeError, AttributeError):
            msg = text
        return EngineError(status if status < 500 else 502, f"upstream: {msg}")

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    def close(self) -> None:
        pass  # the session is closed by aclose, in the event loop that made it


class UpstreamStream:
    """An open streamed answer from the upstream (read with ``UpstreamEngine.events``)."""

    def __init__(self, response):
        self.response = response
        self.done = False

    async def aclose(self) -> None:
        # A finished stream's connection goes back to the pool; one left midway is dropped, so
        # the rest of that answer is never read as the start of the next.
        if self.done:
            self.response.release()
        else:
            self.response.close()
