"""Session tokens for the end user's client: HS256 JWTs (PyJWT), signed with the store's persisted key.

The claims derive only from the session, so an idempotent retry of CreateSession gets the very same token,
and the key lives in the database, so tokens stay valid across restarts and across processes on one file.
"""
from __future__ import annotations

from typing import Any

import jwt

from ..domain.model import Session

ISSUER = "flowsession"
ALGORITHM = "HS256"


def issue(session: Session, key: bytes) -> str:
    claims = {
        "iss": ISSUER,
        "sub": session.session_id,
        "env": session.environment,
        "iat": int(session.create_time.timestamp()),
        "exp": int(session.expire_time.timestamp()),
    }
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def verify(token: str, key: bytes) -> dict[str, Any]:
    """Decodes and checks signature, issuer and expiry; raises jwt.InvalidTokenError otherwise."""
    # Not iat (PyJWT checks it by default): it is when the session began by the issuing server's clock,
    # not a validity bound, and a clock stepped back since (or a verifier's behind) would refuse the
    # token of a RUNNING session until that clock caught up.
    return jwt.decode(token, key, algorithms=[ALGORITHM], issuer=ISSUER, options={"verify_iat": False})
