"""Page tokens (domain/paging.py): signed, opaque, bound to the query that issued them."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import random
from typing import Any

import pytest
from flowsession_server.domain import paging
from flowsession_server.domain.errors import InvalidArgument

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
QUERY = {"rpc": "ListSessions", "environment": "live", "flow_id": "flw_1", "statuses": ["RUNNING"], "page_size": 50}
POSITION = [1_767_225_600_000_000, "ses_0123456789abcdef01234567"]


def _raw(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def _token(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def assert_refused(token: str, *, key: bytes = KEY, query: Any = QUERY) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        paging.decode(key, query, token)
    err = info.value
    assert err.reason == "INVALID_PAGE_TOKEN"
    assert [v.field for v in err.violations] == ["page_token"]
    return err


# Round trip


@pytest.mark.parametrize(
    "position",
    [POSITION, [], [0], [3, "flw_x"], ["ünïcode", None, 1.5, True], [2**62, "x" * 500]],
    ids=["keyset", "empty", "int", "version", "mixed", "big"],
)
def test_round_trip(position: list[Any]) -> None:
    token = paging.encode(KEY, QUERY, position)
    assert paging.decode(KEY, QUERY, token) == position


def test_token_is_url_safe_and_unpadded() -> None:
    token = paging.encode(KEY, QUERY, POSITION)
    assert token
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_token_is_deterministic_and_depends_on_position() -> None:
    assert paging.encode(KEY, QUERY, POSITION) == paging.encode(KEY, QUERY, POSITION)
    assert paging.encode(KEY, QUERY, POSITION) != paging.encode(KEY, QUERY, [1, "other"])


def test_query_key_order_does_not_matter() -> None:
    reordered = dict(reversed(list(QUERY.items())))
    token = paging.encode(KEY, QUERY, POSITION)
    assert paging.decode(KEY, reordered, token) == POSITION


def test_empty_token_is_the_first_page() -> None:
    assert paging.decode(KEY, QUERY, "") is None


# Refusals


def test_tampered_position_is_refused() -> None:
    raw = _raw(paging.encode(KEY, QUERY, POSITION))
    body, mac = raw[:-16], raw[-16:]
    forged = json.loads(body)
    forged["p"] = [0, "ses_someone_elses"]
    err = assert_refused(_token(json.dumps(forged, separators=(",", ":")).encode() + mac))
    assert "not issued by this server" in err.violations[0].description


@pytest.mark.parametrize("index", [0, 5, -17, -16, -1])  # body bytes and signature bytes
def test_flipped_byte_is_refused(index: int) -> None:
    raw = bytearray(_raw(paging.encode(KEY, QUERY, POSITION)))
    raw[index] ^= 0x01
    assert_refused(_token(bytes(raw)))


def test_truncated_or_extended_token_is_refused() -> None:
    token = paging.encode(KEY, QUERY, POSITION)
    raw = _raw(token)
    assert_refused(_token(raw[:-1]))
    assert_refused(_token(raw[1:]))
    assert_refused(_token(raw + b"\x00"))
    assert_refused(_token(raw[-16:]))  # the signature alone


@pytest.mark.parametrize(
    "garbage",
    [
        "garbage",
        "a",  # one character: not valid base64 at all
        "!!!!",
        "====",
        "AAAA",
        "é-non-ascii",
        " ",
        "x" * 4096,
        _token(b"\x00" * 16),  # exactly a signature's length, no body
        _token(b"{}" + b"\x00" * 16),  # JSON body, unsigned
        _token(b"\xff\xfe" + b"\x00" * 16),  # not UTF-8
    ],
    ids=["word", "one-char", "punct", "padding", "zeros", "non-ascii", "space", "long", "mac-only", "unsigned-json", "not-utf8"],
)
def test_random_garbage_is_refused(garbage: str) -> None:
    assert_refused(garbage)


def test_token_signed_with_another_key_is_refused() -> None:
    token = paging.encode(OTHER_KEY, QUERY, POSITION)
    assert paging.decode(OTHER_KEY, QUERY, token) == POSITION  # fine for the key that signed it
    err = assert_refused(token)
    assert "not issued by this server" in err.violations[0].description


@pytest.mark.parametrize(
    "other_query",
    [
        {**QUERY, "environment": "test"},
        {**QUERY, "flow_id": "flw_2"},
        {**QUERY, "statuses": ["RUNNING", "COMPLETED"]},
        {**QUERY, "rpc": "ListFlows"},
        {k: v for k, v in QUERY.items() if k != "flow_id"},
        ["ListSessions", "live"],
    ],
    ids=["environment", "flow", "statuses", "rpc", "missing-field", "other-shape"],
)
def test_token_for_another_query_is_refused(other_query: Any) -> None:
    token = paging.encode(KEY, other_query, POSITION)
    assert paging.decode(KEY, other_query, token) == POSITION
    err = assert_refused(token)
    assert "different query" in err.violations[0].description


def test_signed_token_without_list_position_is_refused() -> None:
    """Even a correctly signed body must carry a list position (defence in depth)."""
    for position in ({"a": 1}, "x", 3, None):
        body = json.dumps({"q": paging._query_tag(QUERY), "p": position}, separators=(",", ":")).encode()
        mac = hmac.new(KEY, body, hashlib.sha256).digest()[:16]
        assert_refused(_token(body + mac))


def _one_read_page(items: list[tuple[int, int]], size: int, max_bytes: int) -> tuple[list[tuple[int, int]], int | None]:
    """The page as one read of size + 1 items made it: at most size, ending before the item that would
    pass max_bytes (one always), and the position to go on from (None: the last page)."""
    answers: list[tuple[int, int]] = []
    total = 0
    for item in items[:size]:
        total += item[1] + 8
        if total > max_bytes and answers:
            break
        answers.append(item)
    return answers, (None if len(answers) == len(items) else answers[-1][0])


@pytest.mark.parametrize("first_read", [4, paging.FIRST_READ])
def test_a_page_read_in_parts_is_the_page_one_read_gave_and_reads_about_what_it_holds(monkeypatch, first_read):
    monkeypatch.setattr(paging, "FIRST_READ", first_read)
    rng = random.Random(7)

    async def check() -> None:
        for _ in range(3000):
            listing = [(i, rng.choice([0, 1, 5, 30, 120, 400])) for i in range(rng.randrange(0, 120))]
            size, max_bytes = rng.randrange(1, 80), rng.choice([50, 200, 1000, 10**9])
            start = rng.randrange(0, len(listing) + 1)
            reads: list[int] = []

            async def fetch(after: list[Any] | None, limit: int) -> list[tuple[int, int]]:
                lo = start if after is None else after[0] + 1
                reads.append(len(listing[lo : lo + limit]))
                return listing[lo : lo + limit]

            answers, token = await paging.read_page(
                KEY, QUERY, fetch, None, size, lambda it: [it[0]], lambda it: it, lambda it: it[1], max_bytes
            )
            want, go_on = _one_read_page(listing[start : start + size + 1], size, max_bytes)
            assert answers == want
            assert (paging.decode(KEY, QUERY, token)[0] if token else None) == go_on
            assert sum(reads) <= 2 * len(answers) + paging.FIRST_READ + 1, (reads, len(answers))

    asyncio.run(check())
