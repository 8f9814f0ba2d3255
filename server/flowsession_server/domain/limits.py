"""Input limits. The README's "Limits" table documents these; keep the two in step."""
from __future__ import annotations

import re

MAX_NAME = 200
MAX_DESCRIPTION = 2_000
MAX_ID = 128
MAX_STEPS = 200
MAX_STEP_ID = 64
MAX_STEP_TYPE = 64
MAX_VERDICT = 64
MAX_ROUTES = 50
MAX_STATE = 2_048
MAX_REDIRECT_URL = 2_048
MAX_METADATA_ENTRIES = 50
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_INPUT_BYTES = 256 * 1024
# Objects and lists inside one another. Every session answer and event wraps the input in a few more
# messages, and protobuf parsers refuse messages nested over 100 deep (about 32 JSON levels here):
# a deeper input would be stored, then break every read of it. 20 leaves room for wrapping it further.
MAX_INPUT_DEPTH = 20
MAX_REQUEST_ID = 128
MAX_REASON = 1_024
MAX_ERROR_CODE = 128
MAX_ERROR_MESSAGE = 2_048
MAX_ENVIRONMENT = 64
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1_000
# A list page ends early once it holds this many serialized bytes: gRPC clients refuse messages over 4 MiB by
# default, and 50 sessions with inputs of 256 KiB, or 4 flow versions of 200 wide steps, are more.
MAX_PAGE_BYTES = 3 * 1024 * 1024

# Step ids and verdicts travel in URLs and logs, so keep them to a safe alphabet.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_.\-]+")  # used with fullmatch
