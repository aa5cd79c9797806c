"""Copies of copies the ledger does not record (made by hand in the region, say encrypted twice): each
counts from the AMI the chain starts from, so the late copy of a copy of an old AMI never takes Latest
or a keep slot (no AWS: the other region's EC2 is a stand-in that records what it is asked)."""

from __future__ import annotations

from typing import Any

from ami_janitor.aws.inventory.copy_sources import read_copy_sources
from ami_janitor.core.rotation import changes_for
from builders import NOW, copied, image, inventory, policy

LATEST = {"latest": {"tag": "Latest", "ssm_parameter": "/ami/app/{arch}/latest"}}


class OtherRegion:
    """DescribeImages in another region: the AMIs it lists, and the ids each call asked for."""

    def __init__(self, listed: dict[str, Any]) -> None:
        self.listed = listed
        self.asked: list[list[str]] = []

    def get_paginator(self, name: str) -> Any:
        assert name == "describe_images"
        region = self

        class Pages:
            def paginate(self, **request: Any) -> Any:
                (ids,) = [f["Values"] for f in request["Filters"] if f["Name"] == "image-id"]
                region.asked.append(list(ids))
                images = [
                    {"ImageId": i, "CreationDate": region.listed[i].strftime("%Y-%m-%dT%H:%M:%S.000Z")}
                    for i in ids
                    if i in region.listed
                ]
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
