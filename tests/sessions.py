"""botocore sessions for the tests, as the janitor's clients come from botocore sessions."""

from __future__ import annotations

import botocore.session
from botocore.session import Session


def botocore_session(
    region: str | None = None,
    key: str | None = None,
    secret: str | None = None,
    token: str | None = None,
    *,
    base: Session | None = None,
) -> Session:
    """A session (or `base`) in `region`, with these credentials where given."""
    session = base or botocore.session.get_session()
    if region is not None:
        session.set_config_variable("region", region)
    if key is not None:
        session.set_credentials(key, secret, token)
    return session
