"""Rotations that must not be answered as done: an AMI's `available` event where the region's listing
does not show the AMI yet (DescribeImages by owner may lag the AMI's id) is tried again, not answered
and lost; a group another writer keeps changing through every round is reported failed, not ok."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from ami_janitor.aws import rotator
from ami_janitor.core.model import RegionInventory
from ami_janitor.core.policy import parse_policy
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
    with pytest.raises(
        RuntimeError, match=f"{NEW} is available by its id, but DescribeImages does not list it"
    ):
        rotator.handle_state_change(NEW, "available", clients, POLICY, NOW, load=_lagging(account, NEW))
    assert account.writes == 0
    # Tried again once the listing shows it: Latest moves.
    outcome = rotator.handle_state_change(NEW, "available", clients, POLICY, NOW, load=account.load)
    assert outcome.outcome == "rotated" and account.parameters[PARAMETER] == NEW


def _listed_as(account: Account, image_id: str, state: str) -> Any:
    def load(clients: Any, policy: Any) -> RegionInventory:
        listed = account.load(clients, policy)
        return listed._replace(
            images=tuple(
                i.model_copy(update={"state": state}) if i.image_id == image_id else i for i in listed.images
            )
        )

    return load


@pytest.mark.parametrize("listed", ["pending", "disabled"])
def test_an_available_ami_the_listing_shows_in_an_older_state_is_tried_again(listed: str) -> None:
    """The listing still shows the AMI pending (or disabled, before its owner enabled it) while EC2
    describes it by its id as available: rotated without it, the event was answered and lost."""
    account = _account()
    clients = clients_for(account)
    with pytest.raises(
        rotator.NotYet, match=f"{NEW} is available by its id, but DescribeImages lists it as {listed}"
    ):
        rotator.handle_state_change(
            NEW, "available", clients, POLICY, NOW, load=_listed_as(account, NEW, listed)
        )
    assert account.writes == 0
    outcome = rotator.handle_state_change(NEW, "available", clients, POLICY, NOW, load=account.load)
    assert outcome.outcome == "rotated" and account.parameters[PARAMETER] == NEW


def test_an_available_event_of_an_ami_pending_by_its_id_too_is_tried_again() -> None:
    account = _account()
    account.images[NEW]["state"] = "pending"
    with pytest.raises(
        rotator.NotYet, match=f"{NEW} is pending by its id, but DescribeImages lists it as pending"
    ):
        rotator.handle_state_change(NEW, "available", clients_for(account), POLICY, NOW, load=account.load)
    assert account.writes == 0


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


def test_a_group_still_changing_after_every_round_is_not_reported_settled() -> None:
    """Another writer bakes a newer AMI at each write: after its rounds, the rotation reads the group
    once more and reports it failed (the next event or run settles it), not ok."""
    account = _account()
    clients = clients_for(account)
    baked = iter(range(1, 100))

    def newer_meanwhile() -> None:
        _app(account, f"ami-1{next(baked):016x}", 0, created=NOW + timedelta(minutes=len(account.images)))
        account.on_write = newer_meanwhile

    account.on_write = newer_meanwhile
    [result] = rotator.converge(clients, POLICY, NOW, load=account.load)
    assert result.status == "failed"
    assert result.error is not None and result.error.startswith(
        f"still changing after {rotator.MAX_ROUNDS} rounds"
    )
    account.on_write = None
    [settled] = rotator.converge(clients, POLICY, NOW, load=account.load)
    assert settled.status == "ok"


TAGGED = parse_policy(
    {
        "mode": "enforce",
        "regions": ["us-east-1"],
        "families": [
            {
                "name": "app",
                "match": {"name": "app-*", "tags": {"Project": "App"}},
                "latest": {"tag": "Latest", "ssm_parameter": "/ami/app/{arch}/latest"},
            },
            {"name": "team", "match": {"tags": {"Team": "X"}}},
        ],
    }
)


def test_an_available_ami_a_family_names_is_waited_for_until_it_is_tagged() -> None:
    """A builder (Packer among them) tags an AMI once it is available: its `available` event finds it in
    no family yet. The event is tried again for a few minutes, and rotates once the tags are there."""
    account = Account()
    clients = clients_for(account)
    _app(account, OLD, 30, tags={"Latest": "true", "Project": "App"})
    account.parameters[PARAMETER] = OLD
    _app(account, NEW, 0)  # named as the family names its AMIs, not tagged yet

    sent = NOW - timedelta(minutes=1)
    with pytest.raises(rotator.NotYet, match=f"{NEW} is named as family app names its AMIs"):
        rotator.handle_state_change(NEW, "available", clients, TAGGED, NOW, load=account.load, sent=sent)
    assert account.writes == 0

    account.images[NEW]["tags"]["Project"] = "App"
    outcome = rotator.handle_state_change(
        NEW, "available", clients, TAGGED, NOW, load=account.load, sent=sent
    )
    assert outcome.outcome == "rotated" and account.parameters[PARAMETER] == NEW


@pytest.mark.parametrize(
    ("name", "minutes"),
    [
        ("app-untagged", 6),  # sent longer ago than TAGS_WAIT: the tags are not coming
        ("other-1", 1),  # no family's name glob names it
    ],
)
def test_an_available_ami_no_family_waits_for_is_ignored(name: str, minutes: int) -> None:
    account = Account()
    _app(account, NEW, 0)
    account.images[NEW]["name"] = name
    sent = NOW - timedelta(minutes=minutes)
    outcome = rotator.handle_state_change(
        NEW, "available", clients_for(account), TAGGED, NOW, load=account.load, sent=sent
    )
    assert (outcome.outcome, outcome.why) == ("ignored", "the AMI belongs to no family")


def test_a_region_that_cannot_be_read_again_after_the_writes_leaves_them_as_written() -> None:
    """One result per planned change, whatever the read after the writes says (the run pairs them)."""
    account = Account()
    clients = clients_for(account)
    _app(account, OLD, 30, tags={"Latest": "true"})
    account.parameters[PARAMETER] = OLD
    _app(account, NEW, 0)
    changes = rotator.changes_for(account.load(clients, POLICY), POLICY, NOW)
    reads = iter([account.load(clients, POLICY)])

    def load(c: Any, p: Any) -> RegionInventory:
        return next(reads, RegionInventory(region="us-east-1", error="ec2:DescribeImages: Throttling"))

    [result] = rotator.write_changes(clients, POLICY, changes, NOW, load=load)
    assert (result.status, result.to) == ("ok", NEW) and account.parameters[PARAMETER] == NEW


def _still_available(account: Account, image_id: str) -> Any:
    """The listing as it was before the AMI's change: available, where EC2 by its id says otherwise."""

    def load(clients: Any, policy: Any) -> RegionInventory:
        saved = account.images[image_id]["state"]
        account.images[image_id]["state"] = "available"
        try:
            return account.load(clients, policy)
        finally:
            account.images[image_id]["state"] = saved

    return load


@pytest.mark.parametrize("state", ["disabled", "deregistered"])
def test_an_event_of_the_latest_leaving_that_the_listing_still_shows_available_is_tried_again(
    state: str,
) -> None:
    """The listing still shows Latest's AMI available after its owner disabled or deregistered it: the
    rotation saw nothing to move, and the event was answered and lost (Latest stayed on it)."""
    account = _account()
    clients = clients_for(account)
    rotator.handle_state_change(NEW, "available", clients, POLICY, NOW, load=account.load)
    assert account.parameters[PARAMETER] == NEW
    account.images[NEW]["state"] = state
    writes = account.writes

    with pytest.raises(
        rotator.NotYet, match=f"{NEW} is {'gone' if state == 'deregistered' else state} by its id"
    ):
        rotator.handle_state_change(NEW, state, clients, POLICY, NOW, load=_still_available(account, NEW))
    assert account.writes == writes
    # Tried again once the listing shows it: Latest moves back to the AMI still available.
    rotator.handle_state_change(NEW, state, clients, POLICY, NOW, load=account.load)
    assert account.parameters[PARAMETER] == OLD
