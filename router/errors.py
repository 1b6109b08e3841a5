"""OpenAI's error envelope, and the handlers that put every failure into it.

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

FastAPI's own shapes (422 `detail` lists, `{"detail": "Not Found"}`) never reach a client.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from router.dispatch.backend import BackendOverloaded, BackendRejected, BackendUnavailable
from router.validation_errors import describe_validation_error

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class APIError(Exception):
    """An error the client should see as-is (status + envelope)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class RequestTimedOut(APIError):
    def __init__(self, seconds: float):
        super().__init__(
            504, f"The backend produced nothing for {seconds:g} s; request abandoned.",
            type=SERVER_ERROR, code="timeout",
        )


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is over {limit} bytes, the most this server "
                    "accepts.", code="request_too_large")


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive()` once a request body passes the limit (router/limits.py). An
    HTTPException because FastAPI re-raises those from its body reading (anything else would
    become a generic 400 there)."""

    def __init__(self, limit: int):
        super().__init__(413, too_large(limit).message)
        self.limit = limit


def _printable(text: str | None) -> str | None:
    """A client's text echoed in an error (a model name, a dict key) may hold a lone
    surrogate, which no UTF-8 JSON body can carry: escape it rather than fail with a 500."""
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(
    message: str, type: str = INVALID_REQUEST, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": _printable(message), "type": type, "param": _printable(param),
                      "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str) -> APIError:
    return APIError(
        404, f"The model `{name}` does not exist.", param="model", code="model_not_found"
    )


def api_error_from(exc: BaseException) -> APIError:
    """Any failure as an APIError (also used for errors inside an already-started stream)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, BodyTooLarge):
        return too_large(exc.limit)
    if isinstance(exc, BackendRejected):
        # The request is wrong in itself (a worker said so): the client's error, as a 400.
        return APIError(400, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, BackendOverloaded):
        return APIError(
            429, str(exc) or "The server is overloaded; retry later.", type="rate_limit_error",
            code="rate_limit_exceeded", headers={"Retry-After": str(exc.retry_after_s)},
        )
    if isinstance(exc, BackendUnavailable):
        return APIError(
            503, str(exc) or "No worker is available.", type=SERVER_ERROR,
            code="service_unavailable",
        )
    log.error("unexpected error", exc_info=exc)
    return APIError(500, "Internal server error.", type=SERVER_ERROR, code="internal_error")


def _response(request: Request, err: APIError) -> JSONResponse:
    headers = dict(err.headers)
    echo_id = getattr(request.state, "echo_request_id", None)  # router/deps.py
    if echo_id:
        headers["X-Request-Id"] = echo_id
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    return _response(request, api_error_from(exc))


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param, code = describe_validation_error(exc.errors())
    return _response(request, bad_request(message, param=param, code=code))


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    where = f"({request.method} {request.url.path})"
    if exc.status_code == 404:
        message = f"Invalid URL {where}"
    elif exc.status_code == 405:
        message = f"Method not allowed {where}"
    else:
        message = str(exc.detail)
    err = APIError(
        exc.status_code, message, type=INVALID_REQUEST if exc.status_code < 500 else SERVER_ERROR,
        headers=dict(exc.headers or {}),
    )
    return _response(request, err)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(BackendOverloaded, _on_api_error)
    app.add_exception_handler(BackendUnavailable, _on_api_error)
    app.add_exception_handler(BackendRejected, _on_api_error)
    app.add_exception_handler(BodyTooLarge, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    # Exception goes to Starlette's outermost middleware: still enveloped, and still logged.
    app.add_exception_handler(Exception, _on_api_error)
