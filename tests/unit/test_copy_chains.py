"""Copies of copies the ledger does not record (made by hand in the region, say encrypted twice, or in
another region): each counts from the AMI the chain starts from, so the late copy of a copy of an old AMI
never takes Latest or a keep slot (no AWS: the other regions' EC2 is a stand-in that records what it is
asked; moto's DescribeImages names no copy's source).)"""

from __future__ import annotations

import itertools
from typing import Any

from ami_janitor.aws.inventory.copy_sources import read_copy_sources
from ami_janitor.core.rotation import changes_for
from builders import NOW, copied, image, inventory, policy

LATEST = {"latest": {"tag": "Latest", "ssm_parameter": "/ami/app/{arch}/latest"}}


class OtherRegion:
    """DescribeImages in another region: the AMIs it lists (each its creation, or its creation and the
    AMI and region it was copied from), and the ids each call asked for."""

    def __init__(self, listed: dict[str, Any]) -> None:
        self.listed = listed
        self.asked: list[list[str]] = []

    def _raw(self, image_id: str) -> dict[str, Any]:
        created, *source = (
            self.listed[image_id] if isinstance(self.listed[image_id], tuple) else [self.listed[image_id]]
        )
        raw = {"ImageId": image_id, "CreationDate": created.strftime("%Y-%m-%dT%H:%M:%S.000Z")}
        if source:
            raw |= {"SourceImageId": source[0], "SourceImageRegion": source[1]}
        return raw

    def get_paginator(self, name: str) -> Any:
        assert name == "describe_images"
        region = self

        class Pages:
            def paginate(self, **request: Any) -> Any:
                (ids,) = [f["Values"] for f in request["Filters"] if f["Name"] == "image-id"]
                region.asked.append(list(ids))
                images = [region._raw(i) for i in ids if i in region.listed]
                return [{"Images": images}]

        return Pages()


def _no_other_region(region: str) -> Any:
    raise AssertionError(f"no source is in another region ({region})")


def test_a_hand_copy_of_a_hand_copy_of_an_old_ami_is_not_made_latest() -> None:
    old = image(days_old=100)
    newest = image(days_old=2)
    first = copied(old.image_id, "us-east-1", old.created, recorded=False, days_old=1)
    second = copied(first.image_id, "us-east-1", old.created, recorded=False, days_old=0.5)
    fam = policy(LATEST)

    images, notes = read_copy_sources((old, newest, first, second), "us-east-1", fam, _no_other_region)

    [change] = changes_for(inventory(*images), fam, NOW)
    assert change.to == newest.image_id  # not the copy of the copy, made half a day ago
    by_id = {i.image_id: i for i in images}
    assert by_id[first.image_id].order_time == old.created
    assert by_id[second.image_id].order_time == old.created
    assert notes == []


def test_a_chain_that_starts_in_another_region_asks_there_once() -> None:
    west_old = image(days_old=300, region="us-west-2")
    first = copied(west_old.image_id, "us-west-2", west_old.created, recorded=False, days_old=1)
    second = copied(first.image_id, "us-east-1", west_old.created, recorded=False, days_old=0.5)
    west = OtherRegion({west_old.image_id: west_old.created})

    images, notes = read_copy_sources((first, second), "us-east-1", policy(), lambda region: west)

    assert west.asked == [[west_old.image_id]]
    assert {i.image_id: i.order_time for i in images} == {
        first.image_id: west_old.created,
        second.image_id: west_old.created,
    }
    assert notes == []


def test_a_chain_whose_first_source_is_gone_counts_from_its_oldest_copy() -> None:
    first = copied("ami-0000000000000dead", "us-west-2", NOW, recorded=False, days_old=40)
    second = copied(first.image_id, "us-east-1", NOW, recorded=False, days_old=0.5)
    west = OtherRegion({})

    images, notes = read_copy_sources((first, second), "us-east-1", policy(), lambda region: west)

    by_id = {i.image_id: i for i in images}
    assert by_id[first.image_id].order_time == first.created
    assert by_id[second.image_id].order_time == first.created
    assert notes == [
        f"{first.image_id} is a copy of ami-0000000000000dead (us-west-2), which is not visible: it counts "
        "from its own creation",
        f"{second.image_id} is a copy of ami-0000000000000dead (us-west-2) through {first.image_id}, which is "
        f"not visible: it counts from the creation of {first.image_id}",
    ]


def test_a_chain_through_a_hand_copy_in_another_region_counts_from_where_it_starts() -> None:
    # An old AMI in eu-west-1, copied by hand to us-west-2 yesterday, and that copy copied here today.
    old = image(days_old=300, region="eu-west-1")
    west_copy = image(days_old=1, region="us-west-2")
    here = copied(west_copy.image_id, "us-west-2", NOW, recorded=False, days_old=0.5)
    newest = image(days_old=2)
    west = OtherRegion({west_copy.image_id: (west_copy.created, old.image_id, "eu-west-1")})
    eu = OtherRegion({old.image_id: old.created})
    fam = policy(LATEST)

    images, notes = read_copy_sources(
        (newest, here), "us-east-1", fam, {"us-west-2": west, "eu-west-1": eu}.__getitem__
    )

    assert (west.asked, eu.asked) == ([[west_copy.image_id]], [[old.image_id]])
    assert {i.image_id: i.order_time for i in images}[here.image_id] == old.created
    [change] = changes_for(inventory(*images), fam, NOW)
    assert change.to == newest.image_id  # not the copy made half a day ago of a 300-day-old AMI
    assert notes == []


def test_copies_that_name_each_other_as_sources_are_followed_once_each() -> None:
    a, b = image(days_old=5, region="us-west-2"), image(days_old=9, region="eu-west-1")
    here = copied(a.image_id, "us-west-2", NOW, recorded=False, days_old=0.5)
    west = OtherRegion({a.image_id: (a.created, b.image_id, "eu-west-1")})
    eu = OtherRegion({b.image_id: (b.created, a.image_id, "us-west-2")})

    images, notes = read_copy_sources(
        (here,), "us-east-1", policy(), {"us-west-2": west, "eu-west-1": eu}.__getitem__
    )

    assert (west.asked, eu.asked) == ([[a.image_id]], [[b.image_id]])
    assert images[0].order_time == b.created  # the oldest seen along it
    assert notes == []


def test_a_chain_is_followed_through_at_most_eight_other_regions_amis() -> None:
    # Ten hand copies, each of the one before, in one other region: the newest copied here.
    chain = [image(days_old=100 - n, region="us-west-2") for n in range(10)]
    listed = {chain[0].image_id: chain[0].created} | {
        c.image_id: (c.created, before.image_id, "us-west-2") for before, c in itertools.pairwise(chain)
    }
    west = OtherRegion(listed)
    here = copied(chain[-1].image_id, "us-west-2", NOW, recorded=False, days_old=0.5)

    images, notes = read_copy_sources((here,), "us-east-1", policy(), lambda region: west)

    assert len(west.asked) == 8  # one call a step
    assert images[0].order_time == chain[2].created  # the oldest of the eight seen
    assert notes == [
        f"{here.image_id} is a copy of {chain[1].image_id} (us-west-2) through "
        + ", ".join(f"{c.image_id} (us-west-2)" for c in reversed(chain[2:]))
        + f", which is more than 8 AMIs of other regions away (not followed further): it counts from the "
        f"creation of {chain[2].image_id}"
    ]
