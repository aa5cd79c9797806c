"""An AMI's `available` event where the region's listing does not show the AMI yet (DescribeImages by
owner may lag the AMI's id): the event is tried again, not answered and lost."""

from __future__ import annotations

from typing import Any

import pytest

from ami_janitor.aws import rotator
from ami_janitor.core.model import RegionInventory
from builders import NOW
from unit.test_rotation_properties import POLICY, Account, _app, clients_for

OLD, NEW = "ami-0000000000000000a", "ami-0000000000000000c"
PARAMETER = "/ami/app/x86_64/latest"


def _lagging(account: Account, missing: str) -> Any:
    def load(clients: Any, policy: Any) -> RegionInventory:
        listed = account.load(clients, policy)
        return listed._replace(images=tuple(i for i in listed.images if i.image_id != missing))

    return load


def _account() -> Account:
    account = Account()
    _app(account, OLD, 30, tags={"Latest": "true"})
    account.parameters[PARAMETER] = OLD
    _app(account, NEW, 0)
    return account


def test_an_available_ami_the_listing_does_not_show_yet_is_tried_again() -> None:
    account = _account()
    clients = clients_for(account)
    with pytest.raises(RuntimeError, match=f"{NEW} is available, but DescribeImages does not list it"):
        rotator.handle_state_change(NEW, "available", clients, POLICY, NOW, load=_lagging(account, NEW))
    assert account.writes == 0
    # Tried again once the listing shows it: Latest moves.
    outcome = rotator.handle_state_change(NEW, "available", clients, POLICY, NOW, load=account.load)
    assert outcome.outcome == "rotated" and account.parameters[PARAMETER] == NEW


@pytest.mark.parametrize("since", ["deregistered", "disabled"])
def test_an_available_event_of_an_ami_gone_since_reconciles_the_region(since: str) -> None:
    account = _account()
    account.images[NEW]["state"] = since  # the event is older than the AMI's state now
    outcome = rotator.handle_state_change(
        NEW, "available", clients_for(account), POLICY, NOW, load=_lagging(account, NEW)
    )
    assert outcome.outcome == "rotated"
    assert "every group reconciled" in (outcome.why or "")
    assert account.parameters[PARAMETER] == OLD
