"""A worker's error answers, in OpenAI's envelope, so the router can pass a 4xx to its client as
it is (and never mistake a refused request for a dead worker):

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

400: a body the wire models reject (FastAPI's default would be 422 `{"detail": [...]}`) or a
request the engine refuses (engine.intake.InvalidRequest), both before any streaming;
401: a bad internal token; other statuses keep their code in the same envelope.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.intake import InvalidRequest

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class WorkerError(Exception):
    """An answer other than 200, with OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST,
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param,
                "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


def invalid_request(e: InvalidRequest) -> WorkerError:
    return WorkerError(400, str(e), param=e.param, code=e.code)


def _param(loc: tuple) -> str | None:
    """The field a pydantic error is about: `top_p` for ("body", "params", "top_p"),
    `token_ids` for ("body", "token_ids", 3)."""
    names = [p for p in loc if isinstance(p, str) and p not in ("body", "params")]
    return names[0] if names else None


def _validation_error(exc: RequestValidationError) -> WorkerError:
    errors = exc.errors()
    if not errors:
        return WorkerError(400, "invalid request body")
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    where = ".".join(str(p) for p in loc if p != "body") or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return WorkerError(400, f"{where}: {first.get('msg', 'invalid value')}{more}",
                       param=_param(loc))


def install_error_handlers(app: FastAPI) -> None:
    async def on_worker_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, WorkerError)
        return exc.response()

    async def on_invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, InvalidRequest)
        return invalid_request(exc).response()

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _validation_error(exc).response()

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kind = SERVER_ERROR if exc.status_code >= 500 else INVALID_REQUEST
        err = WorkerError(exc.status_code, str(exc.detail), type=kind)
        response = err.response()
        response.headers.update(exc.headers or {})
        return response

    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises it after this answer, so the server logs the traceback once.
        return WorkerError(500, f"internal error: {exc!r}", type=SERVER_ERROR,
                           code="internal_error").response()

    app.add_exception_handler(WorkerError, on_worker_error)
    app.add_exception_handler(InvalidRequest, on_invalid)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_crash)
