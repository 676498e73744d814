"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: one home for
the server and the router, which import nothing of each other."""

from __future__ import annotations

import orjson
from starlette.responses import Response

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError",
               403: "PermissionDeniedError", 404: "NotFoundError",
               405: "MethodNotAllowedError", 413: "RequestTooLargeError",
               429: "RateLimitError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    """An error answered in OpenAI's shape with this status (the server's handlers do)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "Error"),
                      "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(error_body(status, message, param)), status_code=status,
                    media_type="application/json", headers=headers)
