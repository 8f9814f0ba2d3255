"""Field checks shared by every request: each adds to a Violations collector instead of raising."""
from __future__ import annotations

import unicodedata
from typing import Mapping
from urllib.parse import SplitResult, urlsplit

from . import limits
from .errors import Violations


def text(v: Violations, field: str, value: str, *, max_len: int, required: bool = False) -> None:
    if required and not value:
        v.add(field, "is required")
    elif len(value) > max_len:
        v.add(field, f"must be at most {max_len} characters (got {len(value)})")


def token(v: Violations, field: str, value: str, *, max_len: int, required: bool = True) -> None:
    """A required identifier-like string: bounded and drawn from TOKEN_PATTERN."""
    if not value:
        if required:
            v.add(field, "is required")
        return
    if len(value) > max_len:
        v.add(field, f"must be at most {max_len} characters (got {len(value)})")
    elif not limits.TOKEN_PATTERN.fullmatch(value):
        v.add(field, "may contain only letters, digits, '_', '.' and '-'")


def identifier(v: Violations, field: str, value: str) -> None:
    token(v, field, value, max_len=limits.MAX_ID)


def environment(v: Violations, value: str, known: frozenset[str], field: str = "environment") -> None:
    if not value:
        v.add(field, "is required")
    elif value not in known:
        v.add(field, f"unknown environment {value[:limits.MAX_ENVIRONMENT]!r}; known: {', '.join(sorted(known))}")


def json_depth(v: Violations, field: str, value: object, *, max_depth: int) -> None:
    """How deep objects and lists nest in ``value`` (an object holding only scalars is 1 deep)."""
    todo = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > max_depth:
                    v.add(field, f"must not nest objects and lists more than {max_depth} deep")
                    return
                todo.append((child, depth + 1))


def redirect_url(v: Violations, value: str) -> None:
    if not value:
        return
    if len(value) > limits.MAX_REDIRECT_URL:
        v.add("redirect_url", f"must be at most {limits.MAX_REDIRECT_URL} characters (got {len(value)})")
        return
    try:
        parts = urlsplit(value)
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        # Control characters too: urlsplit drops leading ones (and spaces) before parsing, so a value
        # starting with NUL passed as the URL after it, and was stored as sent.
        or any(c.isspace() or unicodedata.category(c) == "Cc" for c in value)
    ):
        v.add("redirect_url", "must be an absolute http or https URL with a host, without whitespace or control characters")
    elif not _valid_port(parts):
        v.add("redirect_url", "has a port that is not a number from 0 to 65535")


def _valid_port(parts: SplitResult) -> bool:
    try:
        parts.port  # raises for a port that is not a number in 0-65535
    except ValueError:
        return False
    return True


def metadata(v: Violations, value: Mapping[str, str]) -> None:
    if len(value) > limits.MAX_METADATA_ENTRIES:
        v.add("metadata", f"must have at most {limits.MAX_METADATA_ENTRIES} entries (got {len(value)})")
        return
    for key, val in value.items():
        if not key:
            v.add("metadata", "keys must not be empty")
        elif len(key) > limits.MAX_METADATA_KEY:
            v.add(f"metadata[{key[:limits.MAX_METADATA_KEY]!r}]", f"key must be at most {limits.MAX_METADATA_KEY} characters")
        if len(val) > limits.MAX_METADATA_VALUE:
            v.add(f"metadata[{key[:limits.MAX_METADATA_KEY]!r}]", f"value must be at most {limits.MAX_METADATA_VALUE} characters")


def page_size(v: Violations, value: int) -> int:
    """Returns the effective page size (0 -> server default)."""
    if value < 0:
        v.add("page_size", "must not be negative")
        return limits.DEFAULT_PAGE_SIZE
    if value > limits.MAX_PAGE_SIZE:
        v.add("page_size", f"must be at most {limits.MAX_PAGE_SIZE}")
        return limits.MAX_PAGE_SIZE
    return value or limits.DEFAULT_PAGE_SIZE


def version_number(v: Violations, field: str, value: int) -> None:
    if value <= 0:
        v.add(field, "must be a positive version number")
