"""Properties of the organizations' grants a scheduled run checks (core.sharing.organization_checks):
every AMI the janitor granted an organization or OU is read in its turn, and no run reads more than
its limit (hypothesis: the quick profile in `make test`, 10,000 examples in `make fuzz`)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ami_janitor.core.sharing import organization_checks
from builders import granted, image

ORG = "arn:aws:organizations::123456789012:organization/o-abc123"
# Made once: the AMIs (frozen models) each example takes the first `count` of.
GRANTED = [granted(image(days_old=1), f"org:{ORG}") for _ in range(250)]


@given(count=st.integers(0, len(GRANTED)), limit=st.integers(1, 40), day=st.integers(0, 800_000))
def test_each_ami_granted_an_organization_is_read_once_in_turn_and_no_run_reads_more_than_the_limit(
    count: int, limit: int, day: int
) -> None:
    """Over as many consecutive days as the turns take, from any day, every AMI granted an organization
    is read once and only once; no day reads more than the limit; where they fit under it, every run
    reads them all."""
    images = GRANTED[:count]
    ids = sorted(i.image_id for i in images)
    turns = max(1, -(-count // limit))
    granted = {i.image_id: {f"org:{ORG}"} for i in images}
    days = [organization_checks(granted, day + n, limit) for n in range(turns)]
    assert all(len(checked) <= limit for checked in days)
    assert sorted(i for checked in days for i in checked) == ids
    if count <= limit:
        assert days == [ids]
