"""How the API answers errors: JSON with a ``detail`` naming what was wrong.

Authentication comes first: a request whose body FastAPI could not parse (which happens
before the route's dependencies run) is answered 401/403/429 like any other request to the
route when its token does not allow it (:func:`edgeops.api.auth.check_before_body`), and the
body's error only then. Routes may translate errors themselves
(:mod:`edgeops.api.routes._errors`); what they let through is answered here:

=======================================================  ======
raised                                                   status
=======================================================  ======
:class:`~edgeops.errors.NotFoundError` (any subclass)    404
a rollout spec error (its message names the field)       422
a hub without a release repository                       409
any other :class:`~edgeops.errors.ConfigError`           400
a state conflict (:data:`CONFLICT_ERRORS`: pausing a     409
finished rollout, enrolling a device enrolled already,
a stage change the registry does not allow ...)
:class:`~edgeops.errors.DatabaseError`,                  503
:class:`~edgeops.errors.BrokerError`
a corrupt or missing stored artifact                     500
any other :class:`~edgeops.errors.EdgeOpsError`          400
FastAPI's request validation (wrong types, missing       422
fields, malformed JSON), or a pydantic
``ValidationError`` a route lets through
anything else                                            500
=======================================================  ======

The services' errors are answered ``{"detail": "<their one-line message>"}``. The answer to
request validation keeps FastAPI's ``detail`` list (``loc``, ``msg``, ``type`` ...) and adds
``message``, one line naming the first bad field (``body.waves: Input should be a valid
list``; for malformed JSON ``body: JSON decode error at character 12: Expecting value``). An
unexpected exception is logged with its traceback and answered ``{"detail": "internal
error"}``: an answer never carries a traceback.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgeops.errors import BrokerError, ConfigError, DatabaseError, EdgeOpsError, NotFoundError

__all__ = ["CONFLICT_ERRORS", "install_error_handlers", "status_of", "validation_message"]

log = logging.getLogger(__name__)


def _conflict_errors() -> tuple[type[Exception], ...]:
    from edgeops.data.errors import DatasetConflictError
    from edgeops.fleet.identity import EnrollmentError
    from edgeops.pipelines.errors import PipelineError
    from edgeops.registry.errors import InvalidStageTransitionError
    from edgeops.rollout.engine import RolloutError

    return (
        RolloutError,
        EnrollmentError,
        PipelineError,
        InvalidStageTransitionError,
        DatasetConflictError,
    )


CONFLICT_ERRORS: tuple[type[Exception], ...] = _conflict_errors()
"""errors that say the request conflicts with the current state of what it names (409): a
rollout's status that does not allow the operation, a device enrolled already, a pipeline run
that already ended, a stage change the registry does not allow, a dataset that exists"""


def status_of(error: EdgeOpsError) -> int:
    """The HTTP status answering ``error`` (as :mod:`edgeops.api.routes._errors` does)."""
    from edgeops.rollout.spec import RolloutSpecError
    from edgeops.store import CorruptArtifactError, MissingArtifactError
    from edgeops.trust.errors import TrustNotInitialisedError

    if isinstance(error, NotFoundError):
        return 404
    if isinstance(error, RolloutSpecError):
        return 422
    if isinstance(error, TrustNotInitialisedError):
        return 409
    if isinstance(error, ConfigError):
        return 400
    if isinstance(error, CONFLICT_ERRORS):
        return 409
    if isinstance(error, DatabaseError | BrokerError):
        return 503
    if isinstance(error, CorruptArtifactError | MissingArtifactError):
        return 500
    return 400


def _where(loc: Sequence[Any]) -> str:
    """``("body", "waves", 0, "size")`` as ``body.waves[0].size``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "request"


def validation_message(errors: Sequence[Any]) -> str:
    """One line naming the first bad field of a list of pydantic/FastAPI errors."""
    if not errors:
        return "request: invalid"
    first = errors[0]
    loc = list(first.get("loc", ()))
    message = str(first.get("msg", "invalid"))
    if first.get("type") == "json_invalid":
        position = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None
        reason = (first.get("ctx") or {}).get("error")
        where = f" at character {position}" if position is not None else ""
        return f"body: {message}{where}" + (f": {reason}" if reason else "")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{_where(loc)}: {message}{more}"


def _encodable(errors: Sequence[Any]) -> list[Any]:
    """The error list as JSON-ready values; an input that cannot be encoded (bytes that are
    not UTF-8 ...) is left out rather than turning the answer into a 500."""
    try:
        encoded: list[Any] = _finite(jsonable_encoder(list(errors)))
        return encoded
    except Exception:  # noqa: BLE001 (anything jsonable_encoder trips on)
        plain = []
        for error in errors:
            item = {k: v for k, v in dict(error).items() if k in ("loc", "msg", "type")}
            item["loc"] = [p if isinstance(p, int | str) else str(p) for p in item.get("loc", ())]
            plain.append({k: str(v) if k != "loc" else v for k, v in item.items()})
        return plain


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities (which Python's JSON parser accepts in a body, and
    which JSON cannot carry back) written as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_finite(item) for item in value]
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    return value


def _unprocessable(errors: Sequence[Any]) -> JSONResponse:
    return JSONResponse(
        status_code=422,
        content={"detail": _encodable(errors), "message": validation_message(errors)},
    )


async def _refused(request: Request) -> Response | None:
    """The 401/403/429 answer if ``request`` is not allowed on its route, checked when the
    body failed to parse before the route's auth dependencies ran; None if it is allowed."""
    from starlette.concurrency import run_in_threadpool

    from edgeops.api.auth import check_before_body

    try:
        await run_in_threadpool(check_before_body, request)
    except StarletteHTTPException as refusal:
        return await http_exception_handler(request, refusal)
    return None


def install_error_handlers(app: FastAPI) -> None:
    """Map the services' errors, validation errors and unexpected exceptions to JSON."""

    @app.exception_handler(EdgeOpsError)
    async def edgeops_error(request: Request, exc: EdgeOpsError) -> JSONResponse:
        status = status_of(exc)
        if status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(status_code=status, content={"detail": str(exc)})

    @app.exception_handler(RequestValidationError)
    async def request_invalid(request: Request, exc: RequestValidationError) -> Response:
        refused = await _refused(request)
        return refused or _unprocessable(exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400:  # "There was an error parsing the body" comes before auth
            refused = await _refused(request)
            if refused is not None:
                return refused
        return await http_exception_handler(request, exc)

    @app.exception_handler(ValidationError)
    async def model_invalid(request: Request, exc: ValidationError) -> JSONResponse:
        return _unprocessable(exc.errors(include_url=False))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error(
            "unexpected error answering %s %s",
            request.method,
            request.url.path,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        return JSONResponse(status_code=500, content={"detail": "internal error"})
