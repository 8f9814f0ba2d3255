"""Page tokens: an opaque, signed keyset position, bound to the query that issued it.

Signing (HMAC-SHA256, stdlib) makes a token the server did not issue, or one from another query,
fail cleanly with INVALID_ARGUMENT instead of silently returning a wrong page.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any, Callable, TypeVar

from . import limits
from .errors import FieldViolation, InvalidArgument


def _query_tag(query: Any) -> str:
    return hashlib.sha256(json.dumps(query, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def encode(key: bytes, query: Any, position: list[Any]) -> str:
    body = json.dumps({"q": _query_tag(query), "p": position}, separators=(",", ":")).encode()
    mac = hmac.new(key, body, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(body + mac).decode().rstrip("=")


def decode(key: bytes, query: Any, token: str) -> list[Any] | None:
    """The position a token points at, or None for an empty token (the first page)."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body, mac = raw[:-16], raw[-16:]
        if len(raw) <= 16 or not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()[:16]):
            raise ValueError("bad signature")
        data = json.loads(body)
    except (ValueError, TypeError):
        raise _invalid("was not issued by this server") from None
    if data.get("q") != _query_tag(query):
        raise _invalid("belongs to a different query; repeat the request's other fields unchanged")
    position = data.get("p")
    if not isinstance(position, list):
        raise _invalid("was not issued by this server")
    return position


def _invalid(why: str) -> InvalidArgument:
    return InvalidArgument.of([FieldViolation("page_token", f"page token {why}")], reason="INVALID_PAGE_TOKEN")


T = TypeVar("T")
A = TypeVar("A")


def cut(
    key: bytes,
    query: Any,
    items: list[T],
    size: int,
    position: Callable[[T], list[Any]],
    answer: Callable[[T], A],
    weigh: Callable[[A], int],
    max_bytes: int = limits.MAX_PAGE_BYTES,
) -> tuple[list[A], str]:
    """Given up to size + 1 items, returns the page's answers (``answer`` of each item) and the token of
    the next page ("" on the last one). The page also ends before the item whose answer would take it
    over ``max_bytes`` by ``weigh`` (its serialized size; a page always holds one): a page within the
    limits could otherwise exceed the 4 MiB that gRPC clients receive by default, and none could read it."""
    answers: list[A] = []
    total = 0
    for item in items[:size]:
        one = answer(item)
        total += weigh(one) + 8  # the repeated field's tag and length
        if total > max_bytes and answers:
            break
        answers.append(one)
    if len(answers) == len(items):
        return answers, ""
    return answers, encode(key, query, position(items[len(answers) - 1]))
