"""Session tokens under clock steps: the claims are wall-clock times of the issuing server."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import jwt
import pytest

from flowsession_server.api import tokens

KEY = b"k" * 32


def token(create_time: datetime, expire_time: datetime) -> str:
    session = SimpleNamespace(session_id="ses_1", environment="live", create_time=create_time, expire_time=expire_time)
    return tokens.issue(session, KEY)  # type: ignore[arg-type]


def test_a_token_issued_before_the_clock_stepped_back_verifies_while_its_session_runs() -> None:
    # Issued an hour "ahead" of the verifier (its server's clock was stepped back since, or the
    # verifier's clock is behind): the session runs, so the token must verify; PyJWT's default refuses
    # an iat in the future (ImmatureSignatureError) though iat is informational, not a validity bound.
    now = datetime.now(UTC)
    claims = tokens.verify(token(now + timedelta(hours=1), now + timedelta(hours=2)), KEY)
    assert claims["sub"] == "ses_1"
    # exp still bounds it: the token never outlives its session.
    with pytest.raises(jwt.ExpiredSignatureError):
        tokens.verify(token(now - timedelta(hours=2), now - timedelta(seconds=5)), KEY)
