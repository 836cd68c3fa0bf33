"""Errors in OpenAI's format: {"error": {"message", "type", "param", "code"}}, with an HTTP status."""

from __future__ import annotations

from typing import Optional, TypedDict

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
         413: "invalid_request_error", 500: "server_error", 503: "server_error"}


class ErrorDetail(TypedDict):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorBody(TypedDict):
    error: ErrorDetail


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> ErrorBody:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> ErrorBody:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}
