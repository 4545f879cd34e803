"""The ``Idempotency-Key`` request header of an upload (after the IETF draft
draft-ietf-httpapi-idempotency-key-header): 1 to 200 printable ASCII characters, chosen by the
client (a UUID is typical) and sent again unchanged with every retry of the same upload."""

from __future__ import annotations

from typing import Annotated

from fastapi import Header

MAX_KEY = 200
KEY_PATTERN = r"^[\x20-\x7e]+$"  # printable ASCII

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=MAX_KEY,
        pattern=KEY_PATTERN,
        description="retry an upload safely: the same key with the same files and name returns the checkpoint "
        "the first request made (200, no second checkpoint); the same key with another upload is a 422 "
        "`idempotency-key-reused`. 1 to 200 printable ASCII characters, e.g. a UUID",
    ),
]
