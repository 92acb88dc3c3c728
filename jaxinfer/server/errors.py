"""Every error the server returns has OpenAI's body, `{"error": {message, type, param, code}}`.

`type` and `code` follow vLLM's server (`"BadRequestError"`, code 400, ...), so the official
`openai` client raises the matching exception (`openai.BadRequestError` for 400) and shows the
message. A bad body is a 400 naming the field (`param`), with the reason in words; a traceback
never reaches the body (it goes to the server's log when the error is the server's own).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from jaxinfer.server.protocol import RequestError

logger = logging.getLogger("jaxinfer.server")

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class ModelNotFound(Exception):
    """A request for a model this server does not serve (OpenAI and vLLM answer 404)."""

    def __init__(self, requested: str, served: str) -> None:
        super().__init__(f"The model `{requested}` does not exist; this server serves `{served}`")


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": _TYPES.get(status, HTTPStatus(status).phrase.replace(" ", "") + "Error"),
            "param": param,
            "code": status,
        }
    }
    return JSONResponse(body, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(ModelNotFound, _model_not_found)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """pydantic's first error -> (message, param). The rest usually follow from the first."""
    error = errors[0]
    loc = [part for part in error["loc"] if _is_field(part)]
    if loc and loc[0] == "body":
        loc = loc[1:]
    param = ".".join(str(part) for part in loc) or None
    kind, text = error["type"], error["msg"]
    if kind == "json_invalid":
        return f"the request body is not valid JSON: {text}", None
    if kind == "missing":
        return (f"{param} is required" if param else "the request body is missing"), param
    if kind == "extra_forbidden":
        return f"unknown field {param!r}: this server does not take it", param
    text = text.removeprefix("Value error, ")
    shown = repr(error.get("input"))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    if kind.endswith("_type") or kind.startswith(("literal", "less", "greater", "too_")):
        text = f"{text}, got {shown}"
    return (f"{param}: {text}" if param else text), param


def _is_field(part: Any) -> bool:
    """A loc entry that names a field or an index, not one of pydantic's union-member tags
    ('str', 'list[int]', 'TextPart', 'function-after[...]')."""
    if isinstance(part, int):
        return True
    return part.isidentifier() and part[:1].islower() and part not in _TYPE_TAGS


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"}


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    message, param = validation_message(list(error.errors()))
    return error_response(400, message, param)


async def _request_error(request: Request, error: RequestError) -> JSONResponse:
    return error_response(400, str(error), error.param)


async def _model_not_found(request: Request, error: ModelNotFound) -> JSONResponse:
    return error_response(404, str(error), "model")


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    return error_response(error.status_code, str(error.detail))


async def _server_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("internal error serving %s", request.url.path)
    return error_response(500, f"internal server error ({type(error).__name__})")
