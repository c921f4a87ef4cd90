"""The gateway's error responses: :class:`ApiError` (a refusal with its HTTP status, message and
OpenAI error type), the OpenAI-style body every error goes out as, and the app's exception
handlers (:func:`install_error_handlers`), which also count refused chat requests apart from
the arms' error rates."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from serving.engine import EngineError
from serving.metrics import Metrics

CHAT_PATH = "/v1/chat/completions"


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error"):
        self.status, self.message, self.type = status, message, type_


def error_response(status: int, message: str, type_: str = "invalid_request_error") -> JSONResponse:
    """An OpenAI-style error: ``{"error": {"message", "type", "code"}}`` with ``status``."""
    return JSONResponse({"error": {"message": message, "type": type_, "code": status}}, status_code=status)


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """ApiError and EngineError answer with their own status; anything else is a 500 whose body
    names only the exception's type (the traceback goes to the server log)."""

    def count_refused(request, status: int) -> None:
        # Chat requests refused as bad input: counted apart, never against an arm's error rate.
        if status < 500 and request.url.path == CHAT_PATH:
            metrics.inc("vloop_requests_refused_total", "chat requests refused as bad input (4xx)", status=str(status))

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        count_refused(request, e.status)
        return error_response(e.status, e.message, e.type)

    @app.exception_handler(EngineError)
    async def _engine_error(request, e: EngineError):
        count_refused(request, e.status)
        return error_response(e.status, e.message, "invalid_request_error" if e.status < 500 else "server_error")

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        # A bug, not the client's doing: an OpenAI-style 500 error body (Starlette re-raises the
        # exception after this, so its traceback still reaches the server log, not the client).
        return error_response(500, f"internal error ({type(e).__name__}); see the server log", "server_error")
