"""Page tokens: an opaque, signed keyset position, bound to the query that issued it.

Signing (HMAC-SHA256, stdlib) makes a token the server did not issue, or one from another query,
fail cleanly with INVALID_ARGUMENT instead of silently returning a wrong page.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any, Awaitable, Callable, TypeVar

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

# How many items a page's first read asks for at most. A page of at most size items ends early at
# max_bytes, so asking for size + 1 at once read up to 1,001 sessions of 256 KiB (or flow versions of
# 1.4 MB) and decoded them all, for a page of a dozen: later reads ask for about what is expected to
# fit. A page of the default size (and one more item, to tell whether another page follows) is still
# one read.
FIRST_READ = limits.DEFAULT_PAGE_SIZE + 1


async def read_page(
    key: bytes,
    query: Any,
    fetch: Callable[[list[Any] | None, int], Awaitable[list[T]]],
    after: list[Any] | None,
    size: int,
    position: Callable[[T], list[Any]],
    answer: Callable[[T], A],
    weigh: Callable[[A], int],
    max_bytes: int = limits.MAX_PAGE_BYTES,
) -> tuple[list[A], str]:
    """Returns the answers (``answer`` of each item) of the page from just past ``after`` and the token
    of the next page ("" on the last one). ``fetch(after, limit)`` reads up to ``limit`` items of the
    listing from just past ``after``; the page is read in one or more such reads, each going on from the
    last item of the one before (as pages do, so a walk sees what it would with one read a page).

    The page holds at most ``size`` items, and ends before the item whose answer would take it over
    ``max_bytes`` by ``weigh`` (its serialized size; a page always holds one): a page within the limits
    could otherwise exceed the 4 MiB that gRPC clients receive by default, and none could read it."""
    answers: list[A] = []
    total = 0
    last: T | None = None
    want = min(size + 1, FIRST_READ)
    while True:
        items = await fetch(after, want)
        for item in items:
            if len(answers) < size:
                one = answer(item)
                total += weigh(one) + 8  # the repeated field's tag and length
                if total <= max_bytes or not answers:
                    answers.append(one)
                    last = item
                    continue
            # An item past the page: a next page follows.
            assert last is not None
            return answers, encode(key, query, position(last))
        if len(items) < want:
            return answers, ""
        after = position(items[-1])
        # The rest of the page and one item past it, but no more than are expected to fit in its bytes,
        # nor than it holds so far (later items may be bigger): a page reads at most about twice what it
        # holds, plus FIRST_READ.
        fits = int((max_bytes - total) * len(answers) / max(total, 1)) + 2
        want = max(1, min(size + 1 - len(answers), fits, max(FIRST_READ, len(answers))))
