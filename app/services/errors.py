"""Errors the services raise for the API and UI to show (the readers raise CheckpointError)."""

from __future__ import annotations


class ServiceError(Exception):
    status = 400
    title = "Bad request"

    def __init__(self, detail: str, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code


class NotFound(ServiceError):
    status = 404
    title = "Not found"


class Invalid(ServiceError):
    status = 422
    title = "Unprocessable content"


class Conflict(ServiceError):
    status = 409
    title = "Conflict"
