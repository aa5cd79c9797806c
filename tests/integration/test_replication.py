"""Replication on the emulator (moto + the demo emulator's CopyImage with TagSpecifications and
ClientToken) across two regions, the SQS worker with a partial batch failure, and, for what moto
ignores (encryption, the KMS key), the exact requests through botocore's Stubber."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import ANY, Stubber
from moto import mock_aws
from moto.ec2.models import ec2_backends

import lambda_events
from ami_janitor import engine, roles
from ami_janitor.aws import inventory, ledger
from ami_janitor.aws.clients import ClientFactory, RegionClients
from ami_janitor.aws.copier import (
    KMS_PERMISSIONS,
    PERMISSIONS,
    enqueue_copies,
    send_again,
    start_copy,
)
from ami_janitor.aws.inventory import count_calls
from ami_janitor.core import replication
from ami_janitor.core.model import Copy, Image, iso
from ami_janitor.core.policy import (
    COPY_GENERATION_TAG_PREFIX,
    SOURCE_CREATED_TAG,
    SOURCE_IMAGE_TAG,
    SOURCE_REGION_TAG,
    Policy,
    parse_policy,
)
from ami_janitor.core.replication import (
    client_token,
    copy_from_message,
    copy_request,
    handle_failed_replica,
    plan_copies,
)
from ami_janitor.demo import emulator
from ami_janitor.handlers import replicate, scheduled
from builders import ledger_write
from server import make_ledger
from sessions import botocore_session

US, EU, WEST = "us-east-1", "eu-west-1", "us-west-2"
KEY_EU = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
KEY_US = "arn:aws:kms:us-east-1:111122223333:key/0987dcba-09fe-87dc-65ba-ab0987654321"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
POLICY_DATA: dict[str, Any] = {
    "mode": "enforce",
    "regions": [US],
    "families": [
        {
            "name": "web",
            "match": {"tags": {"Project": "Web"}, "name": "web-*"},
            "latest": {"tag": "Latest"},
            "keep_latest": 2,
            "replicate": [{"region": EU, "kms_key_id": KEY_EU}, {"region": WEST}],
        }
    ],
}
POLICY: Policy = parse_policy(POLICY_DATA)


@pytest.fixture
def aws(fake_aws_env: None) -> Iterator[ClientFactory]:
    emulator.install()
    with mock_aws():
        make_ledger((US, EU, WEST))
        yield ClientFactory(botocore_session())  # a full SDK: the tests make resources the janitor never does


def read(factory: ClientFactory, region: str, image_id: str) -> Image:
    """The AMI as EC2 describes it, with its ledger item (what the event handler and the worker read)."""
    image = inventory.describe_image(factory(region), image_id)
    assert image is not None
    view = inventory.read_ledger_items(factory(region), "ami-janitor-ledger", [image_id])
    return image.model_copy(update={"ledger": view.items.get(image_id) if view else None})


def item(factory: ClientFactory, region: str, image_id: str) -> dict[str, Any]:
    """The AMI's ledger item as stored (what the janitor wrote)."""
    raw = factory(region).dynamodb.get_item(
        TableName="ami-janitor-ledger", Key=ledger.key(image_id), ConsistentRead=True
    )
    stored = dict(raw.get("Item") or {})
    stored.pop(ledger.WRITE_ID_ATTRIBUTE, None)  # which write was last: not a record
    return stored


def bake(factory: ClientFactory, name: str, **tags: str) -> Image:
    ec2 = factory(US).ec2
    instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]
    image_id = ec2.create_image(InstanceId=instance["InstanceId"], Name=name)["ImageId"]
    ec2.create_tags(
        Resources=[image_id],
        Tags=[{"Key": k, "Value": v} for k, v in {"Project": "Web", "Team": "web", **tags}.items()],
    )
    image = inventory.describe_image(factory(US), image_id)
    assert image is not None
    return image


def copy_of(source: Image, region: str = EU, key: str | None = KEY_EU, generation: int = 1) -> Copy:
    return Copy(
        family="web",
        source_image_id=source.image_id,
        source_region=US,
        region=region,
        kms_key_id=key,
        generation=generation,
    )


def copies_in(factory: ClientFactory, region: str, source_id: str) -> list[dict[str, Any]]:
    images = factory(region).ec2.describe_images(
        Owners=["self"], Filters=[{"Name": f"tag:{SOURCE_IMAGE_TAG}", "Values": [source_id]}]
    )["Images"]
    return list(images)


def tags_of(raw: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in raw.get("Tags") or []}


def set_state(region: str, image_id: str, state: str) -> None:
    ec2_backends[emulator.DEFAULT_ACCOUNT_ID][region].amis[image_id].state = state


# ---- start_copy on the emulator -----------------------------------------------------------------


def test_a_copy_is_started_in_the_destination_with_its_tags_and_provenance(aws: ClientFactory) -> None:
    source = bake(
        aws, "web-20261124", Latest="true", **{"ami-janitor:keep": "", "ami-janitor:candidate-since": "x"}
    )
    result = start_copy(aws, copy_of(source), source, POLICY)
    assert (result.status, result.detail) == ("ok", "copy started (generation 1)")
    [raw] = copies_in(aws, EU, source.image_id)
    assert raw["ImageId"] == result.image_id and raw["Name"] == "web-20261124"
    assert tags_of(raw) == {
        "Project": "Web",
        "Team": "web",
        SOURCE_IMAGE_TAG: source.image_id,
        SOURCE_REGION_TAG: US,
        SOURCE_CREATED_TAG: iso(source.created),
        COPY_GENERATION_TAG_PREFIX + EU: "1",
    }
    snapshot = raw["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    [snap] = aws(EU).ec2.describe_snapshots(SnapshotIds=[snapshot])["Snapshots"]
    assert tags_of(snap) == tags_of(raw)
    # EC2 says what it was copied from.
    assert (raw["SourceImageId"], raw["SourceImageRegion"]) == (source.image_id, US)
    # The copy is recorded on the source's item (before CopyImage), the replica on the copy's (after),
    # then the copy's id on the source's record (the generation is made).
    recorded = {
        "source_image_id": {"S": source.image_id},
        "source_region": {"S": US},
        "region": {"S": EU},
        "generation": {"N": "1"},
        "token": {"S": client_token(copy_of(source))},
        "source_created": {"S": iso(source.created)},
        "family": {"S": "web"},
        "kms_key_id": {"S": KEY_EU},
        "kms_key_arn": {"S": KEY_EU},
        "started": ANY,
    }
    assert item(aws, US, source.image_id) == {
        "pk": {"S": f"image#{source.image_id}"},
        "sk": {"S": "item"},
        "image_id": {"S": source.image_id},
        "copies": {"M": {f"{EU}#1": {"M": {**recorded, "image_id": {"S": raw["ImageId"]}}}}},
    }
    assert item(aws, EU, raw["ImageId"]) == {
        "pk": {"S": f"image#{raw['ImageId']}"},
        "sk": {"S": "item"},
        "image_id": {"S": raw["ImageId"]},
        "replica": {"M": {**recorded, "image_id": {"S": raw["ImageId"]}}},
    }
    # No tag is written on the source.
    assert COPY_GENERATION_TAG_PREFIX + EU not in tags_of(
        aws(US).ec2.describe_images(ImageIds=[source.image_id])["Images"][0]
    )
    copy = read(aws, EU, raw["ImageId"])
    assert (copy.is_replica, copy.source_image_id, copy.order_time) == (True, source.image_id, source.created)


def test_a_duplicate_request_makes_no_second_copy(aws: ClientFactory) -> None:
    source = bake(aws, "web-1")
    first = start_copy(aws, copy_of(source), source, POLICY)
    fresh = inventory.describe_image(aws(US), source.image_id)
    assert fresh is not None
    again = start_copy(aws, copy_of(source), fresh, POLICY)
    stale = start_copy(aws, copy_of(source), source, POLICY)  # the source as read before the first copy
    assert again.image_id == stale.image_id == first.image_id
    assert again.detail == stale.detail == "already copied (available)"
    assert len(copies_in(aws, EU, source.image_id)) == 1


def test_a_copy_whose_item_was_lost_is_taken_back_without_copyimage(aws: ClientFactory) -> None:
    """The target's table was restored (or made again) and lost the copy's item, while EC2 still lists
    the copy: the source's record names it as made, so its item is written again. No CopyImage: EC2 may
    have forgotten the token, or would refuse it once the request changed (the source's tags here)."""
    source = bake(aws, "web-1")
    first = start_copy(aws, copy_of(source), source, POLICY)
    assert first.image_id is not None
    aws(EU).dynamodb.delete_item(TableName="ami-janitor-ledger", Key=ledger.key(first.image_id))
    aws(US).ec2.create_tags(Resources=[source.image_id], Tags=[{"Key": "Team", "Value": "platform"}])
    recorded = read(aws, US, source.image_id)
    again = start_copy(aws, copy_of(source), recorded, POLICY)
    assert (again.status, again.image_id, again.detail) == (
        "ok",
        first.image_id,
        "its copy's item written again",
    )
    assert len(copies_in(aws, EU, source.image_id)) == 1
    restored = item(aws, EU, first.image_id)["replica"]["M"]
    assert (restored["image_id"]["S"], restored["generation"]["N"]) == (first.image_id, "1")
    # Found again as the janitor's copy: a later request finds it by provenance.
    assert start_copy(aws, copy_of(source), recorded, POLICY).detail == "already copied (available)"


def test_a_copy_found_made_is_confirmed_on_its_sources_record(aws: ClientFactory) -> None:
    # A run stopped between the copy's item and the confirmation on the source: a later request that
    # finds the copy writes its id there (its item may expire one day; the record must say it was made).
    source = bake(aws, "web-1")
    first = start_copy(aws, copy_of(source), source, POLICY)
    aws(US).dynamodb.update_item(
        TableName="ami-janitor-ledger",
        Key=ledger.key(source.image_id),
        UpdateExpression="REMOVE copies.#copy.image_id",
        ExpressionAttributeNames={"#copy": f"{EU}#1"},
    )
    unconfirmed = read(aws, US, source.image_id)
    assert unconfirmed.ledger is not None and unconfirmed.ledger.copies[0].image_id is None
    again = start_copy(aws, copy_of(source), unconfirmed, POLICY)
    assert again.detail == "already copied (available)"
    assert item(aws, US, source.image_id)["copies"]["M"][f"{EU}#1"]["M"]["image_id"] == {"S": first.image_id}


def test_a_copy_into_a_region_that_bakes_the_family_too_is_named_apart(aws: ClientFactory) -> None:
    """eu-west-1 baked the same night under the same name (AMI names are unique per region, and the
    emulator refuses a taken name as EC2 does): the copy of us-east-1's bake is named after its source
    region, and is made."""
    baking = parse_policy(
        {
            **POLICY_DATA,
            "regions": [US, EU],
            "families": [
                {
                    **POLICY_DATA["families"][0],
                    "replicate": [{"region": EU}],
                    "bake": {"instance_tag": {"Role": "web"}},
                }
            ],
        }
    )
    source = bake(aws, "web-20261125T020000Z")
    eu = aws(EU).ec2
    instance = eu.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    eu.create_image(InstanceId=instance, Name="web-20261125T020000Z")
    with pytest.raises(ClientError, match=r"InvalidAMIName\.Duplicate"):
        eu.copy_image(SourceImageId=source.image_id, SourceRegion=US, Name="web-20261125T020000Z")

    result = start_copy(aws, copy_of(source, key=None), source, baking)

    assert result.status == "ok" and result.image_id is not None, result
    [made] = eu.describe_images(ImageIds=[result.image_id])["Images"]
    assert made["Name"] == "web-20261125T020000Z-us-east-1"


def test_a_copy_whose_provenance_tag_was_removed_is_still_found(aws: ClientFactory) -> None:
    """The worker finds a source's copies by what EC2 records (SourceImageId), not by a tag anyone may
    remove: a request delivered again after EC2 forgot its ClientToken makes no second copy."""
    source = bake(aws, "web-2")
    first = start_copy(aws, copy_of(source), source, POLICY)
    assert first.status == "ok" and first.image_id is not None
    aws(EU).ec2.delete_tags(Resources=[first.image_id], Tags=[{"Key": SOURCE_IMAGE_TAG}])
    ec2_backends[emulator.DEFAULT_ACCOUNT_ID][EU].__dict__.pop("_ami_janitor_copy_tokens", None)  # forgotten

    again = start_copy(aws, copy_of(source), read(aws, US, source.image_id), POLICY)

    assert (again.status, again.started, again.detail) == ("ok", False, "already copied (available)"), again
    assert again.image_id == first.image_id
    assert [i["ImageId"] for i in aws(EU).ec2.describe_images(Owners=["self"])["Images"]] == [first.image_id]


def test_a_failed_copy_is_started_again_with_the_next_generation(aws: ClientFactory) -> None:
    source = bake(aws, "web-2")
    first = start_copy(aws, copy_of(source), source, POLICY)
    assert first.image_id is not None
    set_state(EU, first.image_id, "failed")
    retry = handle_failed_replica(read(aws, EU, first.image_id), POLICY)
    assert retry.copy == copy_of(source, generation=2)
    fresh = read(aws, US, source.image_id)
    # A late duplicate of the first request: its generation already failed.
    assert start_copy(aws, copy_of(source), fresh, POLICY).detail == "generation 1 failed already"
    second = start_copy(aws, retry.copy, fresh, POLICY)
    assert second.status == "ok" and second.image_id not in (None, first.image_id)
    states = sorted((r["Name"], r["State"]) for r in copies_in(aws, EU, source.image_id))
    assert states == [("web-2", "failed"), ("web-2-copy2", "available")]
    recorded = read(aws, US, source.image_id).ledger
    assert recorded is not None
    assert [(c.region, c.generation) for c in recorded.copies] == [(EU, 1), (EU, 2)]
    # The first request, delivered once more, is now outdated.
    latest = read(aws, US, source.image_id)
    assert start_copy(aws, copy_of(source), latest, POLICY).detail == "already copied (available)"


def test_a_failed_copy_event_plans_its_retry_from_the_ledger_never_from_a_tag(aws: ClientFactory) -> None:
    source = bake(aws, "web-10")
    first = start_copy(aws, copy_of(source), source, POLICY)
    assert first.image_id is not None
    set_state(EU, first.image_id, "failed")
    outcome = engine.handle_ami_event(first.image_id, "failed", aws(EU), POLICY, source.created)
    assert outcome.copy_retry == f"{first.image_id} failed: generation 2 planned"
    # An AMI that only carries the provenance tags is no copy of the janitor's: nothing is retried.
    instance = aws(EU).ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]
    lookalike = aws(EU).ec2.create_image(InstanceId=instance["InstanceId"], Name="web-10-lookalike")[
        "ImageId"
    ]
    provenance = {
        SOURCE_IMAGE_TAG: source.image_id,
        SOURCE_REGION_TAG: US,
        COPY_GENERATION_TAG_PREFIX + EU: "1",
    }
    aws(EU).ec2.create_tags(
        Resources=[lookalike], Tags=[{"Key": k, "Value": v} for k, v in provenance.items()]
    )
    set_state(EU, lookalike, "failed")
    outcome = engine.handle_ami_event(lookalike, "failed", aws(EU), POLICY, source.created)
    assert outcome.copy_retry == f"{lookalike} is not a copy made by the janitor"


def queue_into(queued: list[Copy]) -> engine.Enqueue:
    """An enqueue that takes every copy into `queued` (what SQS would have been sent)."""

    def enqueue(copies: Sequence[Copy]) -> int:
        queued.extend(copies)
        return len(copies)

    return enqueue


def test_an_available_event_leaves_a_recorded_copy_to_the_scheduled_run(aws: ClientFactory) -> None:
    """An older source available again (the owner enabled it, a rescue): its copy to eu-west-1 is
    recorded, then deregistered. The event queues only the target with no copy recorded; the old token
    would be answered with the gone copy and reported started."""
    source = bake(aws, "web-2")
    first = start_copy(aws, copy_of(source), source, POLICY)
    assert first.status == "ok" and first.image_id is not None
    aws(EU).ec2.deregister_image(ImageId=first.image_id)
    queued: list[Copy] = []
    enqueue = queue_into(queued)

    outcome = engine.handle_ami_event(
        source.image_id, "available", aws(US), POLICY, source.created, enqueue=enqueue
    )

    assert queued == [copy_of(source, region=WEST, key=None)]
    assert outcome.copies_queued == 1
    assert outcome.copies_skipped == [
        f"family web: copy of {source.image_id} to {EU} recorded already (generation 1): the scheduled run checks it"
    ]


def test_an_available_event_leaves_an_older_sources_copies_to_the_scheduled_run(aws: ClientFactory) -> None:
    """An AMI older than the keep_latest (2) newest of its group, available again (enabled by hand, a
    rescue) and never copied: a target group would not keep its copy, so the event queues none; the
    newest still gets its copies at once."""
    sources = [bake(aws, f"web-{n}") for n in range(3)]
    for n, source in enumerate(sources):
        emulator.set_image_fields(US, source.image_id, creation_date=source.created.replace(day=1 + n))
    queued: list[Copy] = []
    enqueue = queue_into(queued)

    old = engine.handle_ami_event(
        sources[0].image_id, "available", aws(US), POLICY, sources[2].created, enqueue=enqueue
    )
    assert queued == [] and old.copies_queued == 0
    assert old.copies_skipped == [
        f"{sources[0].image_id} is not among the 2 newest of its group in {US}: the scheduled run decides its copies"
    ]
    new = engine.handle_ami_event(
        sources[2].image_id, "available", aws(US), POLICY, sources[2].created, enqueue=enqueue
    )
    assert new.copies_queued == 2 and {c.source_image_id for c in queued} == {sources[2].image_id}
    # A rollback: the newer two disabled, the oldest is among the newest that launch again.
    for newer in sources[1:]:
        aws(US).ec2.disable_image(ImageId=newer.image_id)
    back = engine.handle_ami_event(
        sources[0].image_id, "available", aws(US), POLICY, sources[2].created, enqueue=enqueue
    )
    assert back.copies_queued == 2 and back.copies_skipped == []


def test_an_available_event_reads_its_ami_and_ledger_item_from_the_rotations_read(aws: ClientFactory) -> None:
    """The rotation has just read the region (every AMI, the whole ledger): the new source and its item
    are taken from that read, not asked for again by id. A failed AMI's event reads no region, so its
    AMI is read by id."""
    source = bake(aws, "web-5")
    clients = aws(US)
    calls = count_calls(clients.ec2, clients.dynamodb)

    outcome = engine.handle_ami_event(
        source.image_id, "available", clients, POLICY, source.created, enqueue=len
    )

    assert outcome.copies_queued == 2 and outcome.shared == []
    # The region read before the rotation's write and after it (it converges), and nothing by id.
    assert calls == {"ec2:DescribeImages": 2, "dynamodb:Scan": 2, "ec2:CreateTags": 1}
    calls.clear()
    failed = engine.handle_ami_event(source.image_id, "failed", clients, POLICY, source.created)
    assert failed.copy_retry is not None
    assert calls == {"ec2:DescribeImages": 1, "dynamodb:BatchGetItem": 1}


def test_an_available_event_counts_the_copies_sqs_did_not_take(aws: ClientFactory) -> None:
    """SQS took one of the two copies: the outcome says so (and the handler fails the invocation)."""
    source = bake(aws, "web-3")
    outcome = engine.handle_ami_event(
        source.image_id, "available", aws(US), POLICY, source.created, enqueue=lambda copies: len(copies) - 1
    )
    assert (outcome.copies_queued, outcome.copies_not_queued) == (1, 1)
    everything = engine.handle_ami_event(
        source.image_id, "available", aws(US), POLICY, source.created, enqueue=len
    )
    assert (everything.copies_queued, everything.copies_not_queued) == (2, None)
    assert "copies_not_queued" not in everything.model_dump(mode="json")


def test_an_available_event_for_a_copy_of_an_own_ami_queues_no_copy(aws: ClientFactory) -> None:
    """A copy made by hand in eu-west-1 of a us-east-1 AMI (both source regions): its event queues no
    copy of it (EC2 names its source, one of the account's AMIs); its source's own copies are the
    scheduled run's and its event's."""
    both = parse_policy(
        {
            **POLICY_DATA,
            "regions": [US, EU],
            "families": [{**POLICY_DATA["families"][0], "replicate": [{"region": WEST}]}],
        }
    )
    source = bake(aws, "web-2")
    eu = aws(EU).ec2
    by_hand = eu.copy_image(SourceImageId=source.image_id, SourceRegion=US, Name="web-2-by-hand")["ImageId"]
    eu.create_tags(Resources=[by_hand], Tags=[{"Key": "Project", "Value": "Web"}])
    queued: list[Copy] = []
    enqueue = queue_into(queued)

    outcome = engine.handle_ami_event(
        by_hand, "available", aws(EU), both, source.created, enqueue=enqueue, clients_for=aws
    )

    assert queued == [] and outcome.copies_queued == 0
    assert outcome.copies_skipped == [
        f"{by_hand} is a copy of {source.image_id} ({US}), one of this account's AMIs: never copied onward"
    ]


def test_an_available_event_outside_the_policys_regions_queues_no_copy(aws: ClientFactory) -> None:
    """A family's AMI made in a replicate target that is no source region: the worker would refuse its
    copies every time, into the dead-letter queue."""
    ec2 = aws(EU).ec2
    instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]
    image_id = ec2.create_image(InstanceId=instance["InstanceId"], Name="web-eu")["ImageId"]
    ec2.create_tags(Resources=[image_id], Tags=[{"Key": "Project", "Value": "Web"}])
    queued: list[Copy] = []
    enqueue = queue_into(queued)

    outcome = engine.handle_ami_event(
        image_id, "available", aws(EU), POLICY, datetime.now(UTC), enqueue=enqueue
    )

    assert queued == [] and outcome.copies_queued == 0
    assert outcome.copies_skipped == [f"{image_id}: {EU} is not one of the policy's regions: no copies"]


def test_plan_then_copy_then_plan_again_on_adapter_inventories(aws: ClientFactory) -> None:
    sources = [bake(aws, f"web-{n}") for n in range(3)]
    for n, source in enumerate(sources):
        emulator.set_image_fields(US, source.image_id, creation_date=source.created.replace(day=1 + n))
    inventories = [inventory.load_images(aws(region), POLICY) for region in (US, EU, WEST)]
    copies = plan_copies(inventories, POLICY, source.created)
    # keep_latest 2: the two newest sources, each to both targets.
    assert [(c.source_image_id, c.region) for c in copies] == [
        (sources[2].image_id, EU),
        (sources[2].image_id, WEST),
        (sources[1].image_id, EU),
        (sources[1].image_id, WEST),
    ]
    for copy in copies:
        read = inventory.describe_image(aws(US), copy.source_image_id)
        assert read is not None
        assert start_copy(aws, copy, read, POLICY).status == "ok"
    inventories = [inventory.load_images(aws(region), POLICY) for region in (US, EU, WEST)]
    assert plan_copies(inventories, POLICY, source.created) == []


class LostReplicaRecord(ClientFactory):
    """Every ledger write in eu-west-1 fails: a run that dies between CopyImage and the replica's record."""

    def __call__(self, region: str) -> RegionClients:
        clients = super().__call__(region)
        if region == EU:

            def lost(**_: Any) -> None:
                raise ClientError({"Error": {"Code": "InternalServerError", "Message": "gone"}}, "UpdateItem")

            clients.dynamodb.meta.events.register("before-call.dynamodb.UpdateItem", lost, unique_id="lost")
        return clients


def test_a_copy_interrupted_before_its_replica_is_recorded_is_finished_with_the_same_token(
    aws: ClientFactory,
) -> None:
    source = bake(aws, "web-6")
    interrupted = start_copy(LostReplicaRecord(), copy_of(source), source, POLICY)
    assert interrupted.status == "failed"
    [raw] = copies_in(aws, EU, source.image_id)
    # EC2 says it is a copy, the ledger does not: an original for now (its own CreationDate).
    unrecorded = read(aws, EU, raw["ImageId"])
    assert (unrecorded.copied_from, unrecorded.is_replica) == (source.image_id, False)
    inventories = [inventory.load_images(aws(region), POLICY) for region in (US, EU, WEST)]
    # The next plan starts the recorded generation again (same ClientToken), not the next one.
    assert copy_of(source) in plan_copies(inventories, POLICY, source.created)
    finished = start_copy(aws, copy_of(source), read(aws, US, source.image_id), POLICY)
    assert (finished.status, finished.image_id) == ("ok", raw["ImageId"])
    assert len(copies_in(aws, EU, source.image_id)) == 1
    assert read(aws, EU, raw["ImageId"]).is_replica
    inventories = [inventory.load_images(aws(region), POLICY) for region in (US, EU, WEST)]
    assert [c.region for c in plan_copies(inventories, POLICY, source.created)] == [WEST]


def test_no_copy_where_a_ledger_table_is_missing(aws: ClientFactory) -> None:
    source = bake(aws, "web-7")
    aws(WEST).dynamodb.update_table(TableName="ami-janitor-ledger", DeletionProtectionEnabled=False)
    aws(WEST).dynamodb.delete_table(TableName="ami-janitor-ledger")
    result = start_copy(aws, copy_of(source, region=WEST, key=None), source, POLICY)
    assert result.status == "failed" and "no ledger table ami-janitor-ledger in us-west-2" in (
        result.error or ""
    )
    assert copies_in(aws, WEST, source.image_id) == []
    # Refused before anything is recorded.
    assert read(aws, US, source.image_id).ledger is None


def test_replicate_plans_without_a_ledger_table_and_says_so_but_applies_only_with_every_table(
    aws: ClientFactory,
) -> None:
    source = bake(aws, "web-9")
    aws(WEST).dynamodb.update_table(TableName="ami-janitor-ledger", DeletionProtectionEnabled=False)
    aws(WEST).dynamodb.delete_table(TableName="ami-janitor-ledger")
    planned = engine.replicate(POLICY, [US], aws, source.created, apply=False)
    assert [(c.source_image_id, c.region) for c in planned.copies] == [
        (source.image_id, EU),
        (source.image_id, WEST),
    ]
    assert any(
        p.startswith("no ledger table ami-janitor-ledger in us-west-2: plan only") for p in planned.problems
    )
    with pytest.raises(ledger.LedgerMissing, match="us-west-2"):
        engine.replicate(POLICY, [US], aws, source.created, apply=True)
    assert copies_in(aws, EU, source.image_id) == []  # refused before any copy, in any region
    make_ledger((WEST,))
    applied = engine.replicate(POLICY, [US], aws, source.created, apply=True)
    assert [r.status for r in applied.copy_results] == ["ok", "ok"]
    assert not any("no ledger table" in p for p in applied.problems)


def test_replicate_by_hand_plans_only_the_copies_a_region_takes_in_flight(
    aws: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limit (300 in EC2; 1 here) counts the copies pending there and those this run makes; copies
    of a family not asked for take no room."""
    monkeypatch.setattr(replication, "MAX_CONCURRENT_COPIES", 1)
    api = {
        "name": "api",
        "match": {"tags": {"Project": "Api"}, "name": "api-*"},
        "replicate": [{"region": EU}],
    }
    both = parse_policy({**POLICY_DATA, "families": [*POLICY_DATA["families"], api]})
    web = bake(aws, "web-5")
    bake(aws, "api-5", Project="Api")
    only_web = engine.replicate(both, [US], aws, web.created, families=["web"], apply=False)
    assert [(c.family, c.region) for c in only_web.copies] == [("web", EU), ("web", WEST)]
    assert not any("later run" in p for p in only_web.problems)
    applied = engine.replicate(both, [US], aws, web.created, families=["web"], apply=True)
    assert [r.status for r in applied.copy_results] == ["ok", "ok"]
    (copy,) = copies_in(aws, EU, web.image_id)
    set_state(EU, copy["ImageId"], "pending")
    planned = engine.replicate(both, [US], aws, web.created, apply=False)
    assert planned.copies == []  # the api copy waits for the web copy in flight in eu-west-1
    assert (
        "1 copy to eu-west-1 left for a later run: EC2 takes 1 copies in flight per region (1 in flight "
        "there, 0 planned now)"
    ) in planned.problems


def test_a_request_for_a_source_this_account_does_not_have_is_skipped_saying_so(aws: ClientFactory) -> None:
    source = bake(aws, "web-2")
    unknown = copy_of(source).model_copy(update={"source_image_id": "ami-0123456789abcdef0"})
    result = engine.start_requested_copy(unknown, POLICY, aws)
    assert (result.status, result.detail) == (
        "skipped",
        f"source ami-0123456789abcdef0 is not one of this account's AMIs in {US}: deregistered since the "
        "request was queued, or never one of them",
    )
    assert copies_in(aws, EU, "ami-0123456789abcdef0") == []


def test_a_request_from_an_older_policy_is_skipped(aws: ClientFactory) -> None:
    source = bake(aws, "web-3")
    gone = copy_of(source, region="ap-south-1")
    result = start_copy(aws, gone, source, POLICY)
    assert (result.status, result.detail) == (
        "skipped",
        "ap-south-1 is no longer a replicate target of family web",
    )
    assert (
        start_copy(aws, copy_of(source).model_copy(update={"family": "old"}), source, POLICY).status
        == "skipped"
    )


# ---- exact requests (Stubber): encryption and the key are what moto ignores -------------------------


@pytest.fixture
def stubbed(fake_aws_env: None) -> Iterator[dict[str, tuple[Any, Stubber]]]:
    """EC2 (by region) and DynamoDB (by "db:" + region) clients, each with its Stubber."""
    clients = {region: boto3.client("ec2", region_name=region, **CREDENTIALS) for region in (US, EU)}
    clients.update(
        {f"db:{region}": boto3.client("dynamodb", region_name=region, **CREDENTIALS) for region in (US, EU)}
    )
    stubbers = {region: Stubber(client) for region, client in clients.items()}
    for stubber in stubbers.values():
        stubber.activate()
    yield {region: (clients[region], stubbers[region]) for region in clients}
    for stubber in stubbers.values():
        stubber.assert_no_pending_responses()
        stubber.deactivate()


def region_clients(stubbed: dict[str, tuple[Any, Stubber]]) -> dict[str, RegionClients]:
    return {
        region: RegionClients(region, ec2=stubbed[region][0], dynamodb=stubbed[f"db:{region}"][0])
        for region in (US, EU)
    }


TABLE = "ami-janitor-ledger"


def expect_table(stub: Stubber) -> None:
    stub.add_response("describe_table", {"Table": {"TableName": TABLE}}, {"TableName": TABLE})


def ledger_entry(copy: Copy) -> dict[str, Any]:
    return {
        "M": {
            "source_image_id": {"S": copy.source_image_id},
            "source_region": {"S": copy.source_region},
            "region": {"S": copy.region},
            "generation": {"N": str(copy.generation)},
            "token": {"S": client_token(copy)},
            "source_created": {"S": "2026-11-24T02:00:00Z"},
            "family": {"S": copy.family},
            # The key CopyImage gets, as the policy names it and as a key ARN.
            **({"kms_key_id": {"S": copy.kms_key_id}} if copy.kms_key_id else {}),
            **({"kms_key_arn": {"S": copy.kms_key_arn or copy.kms_key_id}} if copy.kms_key_id else {}),
            "started": ANY,  # when the copy was started (now)
        }
    }


def expect_record_copy(stub: Stubber, copy: Copy, *, recorded_before: bool = False) -> None:
    """The two writes of Ledger.record_copy on the source's item: the map of copies, then this copy once."""
    key = ledger.key(copy.source_image_id)
    stub.add_response(
        "update_item",
        {},
        ledger_write(
            {
                "TableName": TABLE,
                "Key": key,
                "UpdateExpression": "SET image_id = if_not_exists(image_id, :id), copies = if_not_exists(copies, :none)",
                "ExpressionAttributeValues": {":id": {"S": copy.source_image_id}, ":none": {"M": {}}},
            }
        ),
    )
    expected = ledger_write(
        {
            "TableName": TABLE,
            "Key": key,
            "UpdateExpression": "SET copies.#copy = :copy",
            "ConditionExpression": "attribute_not_exists(copies.#copy)",
            "ExpressionAttributeNames": {"#copy": f"{copy.region}#{copy.generation}"},
            "ExpressionAttributeValues": {":copy": ledger_entry(copy)},
        }
    )
    if recorded_before:
        stub.add_client_error(
            "update_item", service_error_code="ConditionalCheckFailedException", expected_params=expected
        )
    else:
        stub.add_response("update_item", {}, expected)


def expect_confirm_copy(stub: Stubber, copy: Copy, image_id: str, *, error: str | None = None) -> None:
    """Ledger.confirm_copy on the source's item: the copy's id on its record of that generation."""
    expected = ledger_write(
        {
            "TableName": TABLE,
            "Key": ledger.key(copy.source_image_id),
            "UpdateExpression": "SET copies.#copy.image_id = :image",
            "ConditionExpression": "attribute_exists(copies.#copy)",
            "ExpressionAttributeNames": {"#copy": f"{copy.region}#{copy.generation}"},
            "ExpressionAttributeValues": {":image": {"S": image_id}},
        }
    )
    if error:
        stub.add_client_error("update_item", service_error_code=error, expected_params=expected)
    else:
        stub.add_response("update_item", {}, expected)


def expect_record_replica(stub: Stubber, copy: Copy, image_id: str) -> None:
    entry = ledger_entry(copy)
    stub.add_response(
        "update_item",
        {},
        ledger_write(
            {
                "TableName": TABLE,
                "Key": ledger.key(image_id),
                "UpdateExpression": "SET image_id = :id, replica = :replica",
                "ConditionExpression": "attribute_not_exists(replica) OR replica.#token = :token",
                "ExpressionAttributeNames": {"#token": "token"},
                "ExpressionAttributeValues": {
                    ":id": {"S": image_id},
                    ":replica": {"M": {**entry["M"], "image_id": {"S": image_id}}},
                    ":token": {"S": client_token(copy)},
                },
            }
        ),
    )


def source_image(**fields: Any) -> Image:
    values: dict[str, Any] = {
        "image_id": "ami-0123456789abcdef0",
        "region": US,
        "name": "web-20261124",
        "architecture": "x86_64",
        "state": "available",
        "created": datetime(2026, 11, 24, 2, 0, tzinfo=UTC),
        "tags": {"Project": "Web", "Latest": "true", "ami-janitor:candidate-since": "2026-11-01T00:00:00Z"},
        "snapshot_ids": ("snap-0123456789abcdef0",),
    }
    return Image(**{**values, **fields})


def lookup(source_id: str) -> dict[str, Any]:
    return {
        "Owners": ["self"],
        "IncludeDeprecated": True,
        "IncludeDisabled": True,
        "Filters": [{"Name": "source-image-id", "Values": [source_id]}],
    }


def test_exact_requests_of_an_encrypted_copy(stubbed: dict[str, tuple[Any, Stubber]]) -> None:
    eu_stub = stubbed[EU][1]
    us_db, eu_db = stubbed[f"db:{US}"][1], stubbed[f"db:{EU}"][1]
    source = source_image()
    copy = copy_of(source, generation=2)
    tags = [
        {"Key": "Project", "Value": "Web"},
        {"Key": SOURCE_IMAGE_TAG, "Value": source.image_id},
        {"Key": SOURCE_REGION_TAG, "Value": US},
        {"Key": SOURCE_CREATED_TAG, "Value": "2026-11-24T02:00:00Z"},
        {"Key": COPY_GENERATION_TAG_PREFIX + EU, "Value": "2"},
    ]
    eu_stub.add_response("describe_images", {"Images": []}, lookup(source.image_id))
    # Both ledger tables are there, the copy is recorded on the source, then CopyImage, then the replica.
    expect_table(us_db)
    expect_table(eu_db)
    expect_record_copy(us_db, copy)
    eu_stub.add_response(
        "copy_image",
        {"ImageId": "ami-0fedcba9876543210"},
        {
            "SourceRegion": US,
            "SourceImageId": source.image_id,
            "Name": "web-20261124-copy2",
            "Description": "[Copied ami-0123456789abcdef0 from us-east-1] web-20261124",
            "Encrypted": True,
            "KmsKeyId": KEY_EU,
            "ClientToken": client_token(copy),
            "CopyImageTags": False,
            "TagSpecifications": [
                {"ResourceType": "image", "Tags": tags},
                {"ResourceType": "snapshot", "Tags": tags},
            ],
        },
    )
    expect_record_replica(eu_db, copy, "ami-0fedcba9876543210")
    expect_confirm_copy(us_db, copy, "ami-0fedcba9876543210")
    result = start_copy(region_clients(stubbed).__getitem__, copy, source, POLICY)
    assert (result.status, result.image_id) == ("ok", "ami-0fedcba9876543210")
    assert result.detail == "copy started (generation 2)"
    # No tag is written on the source: its EC2 Stubber expects no call.


def test_exact_request_of_an_encrypt_in_place_copy(stubbed: dict[str, tuple[Any, Stubber]]) -> None:
    us_stub, us_db = stubbed[US][1], stubbed[f"db:{US}"][1]
    in_place = parse_policy(
        {
            **POLICY_DATA,
            "families": [{**POLICY_DATA["families"][0], "replicate": [{"region": US, "kms_key_id": KEY_US}]}],
        }
    )
    # Recorded already (a redelivered request whose CopyImage was throttled): the same token again.
    source = source_image(tags={"Project": "Web"})
    copy = copy_of(source, region=US, key=KEY_US)
    request = copy_request(copy, source, in_place)
    assert (request["Name"], request["Encrypted"], request["KmsKeyId"]) == (
        "web-20261124-encrypted",
        True,
        KEY_US,
    )
    us_stub.add_response("describe_images", {"Images": []}, lookup(source.image_id))
    expect_table(us_db)  # one region: one table
    expect_record_copy(us_db, copy, recorded_before=True)
    us_stub.add_response("copy_image", {"ImageId": "ami-0fedcba9876543210"}, request)
    expect_record_replica(us_db, copy, "ami-0fedcba9876543210")
    expect_confirm_copy(us_db, copy, "ami-0fedcba9876543210")
    result = start_copy(region_clients(stubbed).__getitem__, copy, source, in_place)
    assert (result.status, result.detail) == ("ok", "copy started (generation 1)")


def test_a_copy_whose_id_the_source_item_cannot_take_is_still_started(
    stubbed: dict[str, tuple[Any, Stubber]],
) -> None:
    # The copy is made and its own item records it: the source's record lacks only its id, which a
    # retired copy's expired item would one day need (then its token is tried once more).
    eu_stub = stubbed[EU][1]
    us_db, eu_db = stubbed[f"db:{US}"][1], stubbed[f"db:{EU}"][1]
    source = source_image()
    copy = copy_of(source)
    eu_stub.add_response("describe_images", {"Images": []}, lookup(source.image_id))
    expect_table(us_db)
    expect_table(eu_db)
    expect_record_copy(us_db, copy)
    eu_stub.add_response(
        "copy_image", {"ImageId": "ami-0fedcba9876543210"}, copy_request(copy, source, POLICY)
    )
    expect_record_replica(eu_db, copy, "ami-0fedcba9876543210")
    expect_confirm_copy(us_db, copy, "ami-0fedcba9876543210", error="ProvisionedThroughputExceededException")
    result = start_copy(region_clients(stubbed).__getitem__, copy, source, POLICY)
    us_db.assert_no_pending_responses()
    assert (result.status, result.image_id, result.started) == ("ok", "ami-0fedcba9876543210", True)
    assert result.detail is not None
    assert result.detail.startswith(
        "copy started (generation 1); its id not recorded on the source's item: ProvisionedThroughputExceededException"
    )


def test_a_throttled_copy_is_a_failed_result_not_an_exception(
    stubbed: dict[str, tuple[Any, Stubber]],
) -> None:
    eu_stub = stubbed[EU][1]
    us_db, eu_db = stubbed[f"db:{US}"][1], stubbed[f"db:{EU}"][1]
    source = source_image()
    eu_stub.add_response("describe_images", {"Images": []}, lookup(source.image_id))
    expect_table(us_db)
    expect_table(eu_db)
    expect_record_copy(us_db, copy_of(source))
    eu_stub.add_client_error("copy_image", "RequestLimitExceeded", "Request limit exceeded.")
    # No replica is recorded: the next plan starts generation 1 again, with its token.
    result = start_copy(region_clients(stubbed).__getitem__, copy_of(source), source, POLICY)
    assert (result.status, result.error) == ("failed", "RequestLimitExceeded: Request limit exceeded.")


def test_permissions_name_what_the_code_calls() -> None:
    assert PERMISSIONS == [
        "dynamodb:BatchGetItem",
        "dynamodb:DescribeTable",
        "dynamodb:UpdateItem",
        "ec2:CopyImage",
        "ec2:CreateTags",
        "ec2:DescribeImages",
    ]
    assert set(roles.REPLICATE_PERMISSIONS) == set(PERMISSIONS) | set(KMS_PERMISSIONS)
    assert "kms:GenerateDataKeyWithoutPlaintext" in KMS_PERMISSIONS


# ---- the queue and the worker -------------------------------------------------------------------


def test_enqueued_copies_come_back_as_the_same_requests(aws: ClientFactory) -> None:
    sqs = boto3.client("sqs", region_name=US)
    url = sqs.create_queue(QueueName="copies")["QueueUrl"]
    copies = [copy_of(source_image(image_id=f"ami-{n:017x}")) for n in range(1, 13)]
    assert enqueue_copies(sqs, url, copies) == 12
    received: list[Copy] = []
    while True:
        messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
        if not messages:
            break
        for message in messages:
            received.append(copy_from_message(message["Body"]))
            sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    assert sorted(received, key=lambda c: c.source_image_id) == copies


def test_requests_are_sent_again_with_exact_send_message_batches() -> None:
    """copier.send_again: the bodies as they are, each with the delay, ten per call; an entry SQS
    refuses for a reason of its own is sent once more; what the queue does not take is not raised."""
    sqs = botocore_session(US, "x", "x").create_client("sqs", region_name=US)
    queue = "https://sqs.us-east-1.amazonaws.com/123456789012/copies"
    bodies = [f'{{"n": {n}}}' for n in range(12)]

    def entries(*positions: int) -> list[dict[str, Any]]:
        return [{"Id": str(n % 10), "MessageBody": bodies[n], "DelaySeconds": 10} for n in positions]

    def taken(*ids: int) -> list[dict[str, str]]:
        return [{"Id": str(n), "MessageId": f"m-{n}", "MD5OfMessageBody": "0" * 32} for n in ids]

    refused = {"Id": "3", "SenderFault": False, "Code": "InternalError"}
    with Stubber(sqs) as stub:
        stub.add_response(
            "send_message_batch",
            {"Successful": taken(0, 1, 2, 4, 5, 6, 7, 8, 9), "Failed": [refused]},
            {"QueueUrl": queue, "Entries": entries(*range(10))},
        )
        stub.add_response(
            "send_message_batch",
            {"Successful": [], "Failed": [refused]},
            {"QueueUrl": queue, "Entries": entries(3)},
        )
        stub.add_response(
            "send_message_batch",
            {"Successful": taken(0, 1), "Failed": []},
            {"QueueUrl": queue, "Entries": entries(10, 11)},
        )
        stub.add_client_error("send_message_batch", "AWS.SimpleQueueService.NonExistentQueue")
        assert send_again(sqs, queue, bodies, delay_seconds=10) == set(range(12)) - {3}
        assert send_again(sqs, queue, bodies[:1], delay_seconds=10) == set()
        assert send_again(sqs, queue, [], delay_seconds=10) == set()  # nothing to send: no call
        stub.assert_no_pending_responses()


def test_the_worker_sends_again_each_record_it_has_no_time_for_with_its_delay(
    worker_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exact SendMessageBatch of the worker's records left for the next invocation: their bodies as
    received, delivered after SEND_AGAIN_DELAY_SECONDS; the records SQS took are acknowledged."""
    queue = "https://sqs.us-east-1.amazonaws.com/123456789012/copies"
    monkeypatch.setenv("REPLICATION_QUEUE_URL", queue)
    sqs = botocore_session(US, "x", "x").create_client("sqs", region_name=US)
    monkeypatch.setattr(replicate, "ClientFactory", lambda *_: lambda region: SimpleNamespace(sqs=sqs))
    bodies = [copy_of(source_image(image_id=f"ami-{n:017x}")).model_dump_json() for n in range(1, 3)]
    event = sqs_event(*bodies)
    with Stubber(sqs) as stub:
        stub.add_response(
            "send_message_batch",
            {"Successful": [{"Id": "0", "MessageId": "m-0", "MD5OfMessageBody": "0" * 32}], "Failed": []},
            {
                "QueueUrl": queue,
                "Entries": [
                    {"Id": str(n), "MessageBody": body, "DelaySeconds": replicate.SEND_AGAIN_DELAY_SECONDS}
                    for n, body in enumerate(bodies)
                ],
            },
        )
        # The one SQS did not take is made visible again at once.
        stub.add_response(
            "change_message_visibility_batch",
            {"Successful": [{"Id": "0"}], "Failed": []},
            {
                "QueueUrl": queue,
                "Entries": [{"Id": "0", "ReceiptHandle": "handle-message-1", "VisibilityTimeout": 0}],
            },
        )
        answer = replicate.handler(event, Context(remaining_millis=replicate.RESERVE_MILLIS - 1))  # type: ignore[arg-type]
        stub.assert_no_pending_responses()
    assert answer == {"batchItemFailures": [{"itemIdentifier": "message-1"}]}
    assert 0 < replicate.SEND_AGAIN_DELAY_SECONDS <= 900  # SQS's bounds of DelaySeconds


Context = lambda_events.Context


def sqs_event(*bodies: str) -> dict[str, Any]:
    return lambda_events.sqs_event(*bodies, queue_arn="arn:aws:sqs:us-east-1:123456789012:copies", region=US)


@pytest.fixture
def worker_env(aws: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AWS_REGION", US)
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "ami-janitor")
    monkeypatch.setenv("POWERTOOLS_METRICS_NAMESPACE", "AmiJanitor")
    # Powertools reads the namespace when the module is imported, which may be before this fixture.
    monkeypatch.setattr(replicate.metrics, "namespace", "AmiJanitor")
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(POLICY_DATA))
    monkeypatch.setenv("AMI_JANITOR_CONFIG", str(path))
    return path


class ThrottledWest(ClientFactory):
    """Every CopyImage in us-west-2 is throttled (what the worker sees when the 1/s bucket is empty)."""

    def __call__(self, region: str) -> RegionClients:
        clients = super().__call__(region)
        if region == WEST:

            def throttle(**_: Any) -> None:
                raise ClientError({"Error": {"Code": "RequestLimitExceeded", "Message": "slow"}}, "CopyImage")

            clients.ec2.meta.events.register("before-call.ec2.CopyImage", throttle, unique_id="throttle")
        return clients


def test_the_worker_reports_only_the_failed_records(
    aws: ClientFactory, worker_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replicate, "ClientFactory", ThrottledWest)
    source = bake(aws, "web-4")
    gone = copy_of(source_image(image_id="ami-0000000000000dead"))
    event = sqs_event(
        copy_of(source).model_dump_json(),
        copy_of(source, region=WEST, key=None).model_dump_json(),
        '{"family": "web"}',
        gone.model_dump_json(),
        copy_of(source).model_dump_json(),  # a duplicate in the same batch
    )
    answer = replicate.handler(event, Context())  # type: ignore[arg-type]
    assert answer == {"batchItemFailures": [{"itemIdentifier": "message-1"}, {"itemIdentifier": "message-2"}]}
    assert len(copies_in(aws, EU, source.image_id)) == 1
    assert copies_in(aws, WEST, source.image_id) == []


class SlowCopies(ClientFactory):
    """CopyImage in eu-west-1 throttled, the SDK backing off: each call takes 50 s of the invocation
    (`Clock`); one still running at the function's timeout ends it, its answer lost."""

    def __call__(self, region: str) -> RegionClients:
        clients = super().__call__(region)
        if region == EU:

            def slow(**_: Any) -> None:
                Clock.spent_ms += 50_000
                if Clock.spent_ms >= Clock.timeout_ms:
                    raise InvocationTimedOut

            clients.ec2.meta.events.register("before-call.ec2.CopyImage", slow, unique_id="slow")
        return clients


class InvocationTimedOut(BaseException):
    """Lambda ends the invocation at its timeout: no handler code runs after it."""


class Clock(lambda_events.Context):
    timeout_ms = 300_000  # infra/replication.py WORKER_TIMEOUT
    spent_ms = 0

    def get_remaining_time_in_millis(self) -> int:
        return Clock.timeout_ms - Clock.spent_ms


class SlowCopiesNoSending(SlowCopies):
    """SlowCopies, and SendMessageBatch to the queue refused (throttled past the SDK's retries)."""

    def __call__(self, region: str) -> RegionClients:
        clients = super().__call__(region)
        if region == US:

            def refuse(**_: Any) -> None:
                raise ClientError(
                    {"Error": {"Code": "RequestThrottled", "Message": "slow"}}, "SendMessageBatch"
                )

            clients.sqs.meta.events.register("before-call.sqs.SendMessageBatch", refuse, unique_id="refuse")
        return clients


def slow_batch(
    aws: ClientFactory, monkeypatch: pytest.MonkeyPatch, factory: type[ClientFactory]
) -> tuple[list[Image], list[dict[str, Any]], Any, str]:
    """Five copy requests received in one batch from a queue whose visibility timeout is half an hour:
    the sources, the messages, the queue's client and its URL."""
    monkeypatch.setattr(replicate, "ClientFactory", factory)
    monkeypatch.setattr(Clock, "spent_ms", 0)
    sqs = aws(US).sqs
    queue = sqs.create_queue(QueueName="copies", Attributes={"VisibilityTimeout": "1800"})["QueueUrl"]
    monkeypatch.setenv("REPLICATION_QUEUE_URL", queue)
    sources = [bake(aws, f"web-t{n}") for n in range(5)]
    for source in sources:
        sqs.send_message(QueueUrl=queue, MessageBody=copy_of(source).model_dump_json())
    received = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10)["Messages"]
    assert len(received) == 5
    return sources, received, sqs, queue


def handle_slowly(received: list[dict[str, Any]]) -> dict[str, Any]:
    event = sqs_event(*(m["Body"] for m in received))
    for record, message in zip(event["Records"], received, strict=True):
        record.update(messageId=message["MessageId"], receiptHandle=message["ReceiptHandle"])
    try:
        return replicate.handler(event, Clock())  # type: ignore[arg-type,return-value]
    except InvocationTimedOut:
        pytest.fail("the invocation ran into its timeout: every record of the batch comes again")


def test_the_worker_starts_no_copy_it_has_no_time_left_for_and_sends_it_again_to_the_queue(
    aws: ClientFactory, worker_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slow copies (throttled): the worker stops while it can still answer. Killed at its timeout
    instead, its answer is lost and SQS delivers every record of the batch again, those done too, each
    delivery counting toward the dead-letter queue."""
    sources, received, sqs, queue = slow_batch(aws, monkeypatch, SlowCopies)
    # moto holds a delayed message back for the real seconds.
    monkeypatch.setattr(replicate, "SEND_AGAIN_DELAY_SECONDS", 0)

    answer = handle_slowly(received)

    # 300 s: four copies leave 100 s, under the 120 s reserve: the fifth is left, sent again as a new
    # message and acknowledged (the event source mapping deletes the original).
    assert answer == {"batchItemFailures": []}
    assert [len(copies_in(aws, EU, s.image_id)) for s in sources] == [1, 1, 1, 1, 0]
    [again] = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, AttributeNames=["All"])["Messages"]
    assert again["Body"] == received[4]["Body"]
    # A message of its own, on its first receive: the receives of the original count for nothing.
    assert again["MessageId"] != received[4]["MessageId"]
    assert again["Attributes"]["ApproximateReceiveCount"] == "1"


def test_a_request_not_sent_again_is_made_visible_again_at_once_and_reported_failed(
    aws: ClientFactory, worker_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the queue does not take the request again, it is not lost: the original comes again at once,
    a batch item failure (that delivery counted toward the dead-letter queue, as every delivery was
    before)."""
    sources, received, sqs, queue = slow_batch(aws, monkeypatch, SlowCopiesNoSending)

    answer = handle_slowly(received)

    left = [m["MessageId"] for m in received[4:]]
    assert answer == {"batchItemFailures": [{"itemIdentifier": message_id} for message_id in left]}
    assert [len(copies_in(aws, EU, s.image_id)) for s in sources] == [1, 1, 1, 1, 0]
    # Visible again at once (the queue's visibility timeout is half an hour); the others are not.
    again = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10)["Messages"]
    assert [m["MessageId"] for m in again] == left


# As the deployed queue (infra.replication.MAX_RECEIVE_COUNT): five receives, then the dead-letter queue.
MAX_RECEIVE_COUNT = 5


class ThrottledSlowWest(ClientFactory):
    """CopyImage in us-west-2 throttled past the SDK's retries: each call takes 200 s of the invocation
    (`Clock`), then fails. `tries` counts the calls."""

    tries = 0

    def __call__(self, region: str) -> RegionClients:
        clients = super().__call__(region)
        if region == WEST:

            def slow_then_throttled(**_: Any) -> None:
                ThrottledSlowWest.tries += 1
                Clock.spent_ms += 200_000
                raise ClientError({"Error": {"Code": "RequestLimitExceeded", "Message": "slow"}}, "CopyImage")

            clients.ec2.meta.events.register(
                "before-call.ec2.CopyImage", slow_then_throttled, unique_id="slow-then-throttled"
            )
        return clients


def deliver_until_empty(sqs: Any, queue: str) -> list[dict[str, Any]]:
    """What the event source mapping does until the queue is empty: receive a batch, invoke the worker
    with a fresh invocation's time, delete what it did not report as failed (moto parks a message in the
    dead-letter queue past its redrive policy's maxReceiveCount). The worker's answers, in order."""
    answers: list[dict[str, Any]] = []
    for _ in range(4 * MAX_RECEIVE_COUNT):
        messages = sqs.receive_message(
            QueueUrl=queue, MaxNumberOfMessages=10, VisibilityTimeout=0, AttributeNames=["All"]
        ).get("Messages", [])
        if not messages:
            return answers
        event = sqs_event(*(m["Body"] for m in messages))
        for record, message in zip(event["Records"], messages, strict=True):
            record.update(
                messageId=message["MessageId"],
                receiptHandle=message["ReceiptHandle"],
                attributes={**record["attributes"], **message["Attributes"]},
            )
        Clock.spent_ms = 0
        answer = replicate.handler(event, Clock())  # type: ignore[arg-type]
        answers.append(answer)
        failed = {f["itemIdentifier"] for f in answer["batchItemFailures"]}
        for message in messages:
            if message["MessageId"] not in failed:
                sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])
    raise AssertionError("the queue never emptied")


def test_a_request_left_for_the_next_invocation_delivery_after_delivery_is_never_parked_untried(
    aws: ClientFactory, worker_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Long throttling: the first request of each batch takes most of the invocation, and the one after
    it is left for the next invocation, delivery after delivery. Only a request that was tried counts
    toward the dead-letter queue: the throttled one is parked there after its tries, the one left
    untried is copied once the queue lets it through."""
    monkeypatch.setattr(replicate, "ClientFactory", ThrottledSlowWest)
    monkeypatch.setattr(Clock, "spent_ms", 0)
    sqs = aws(US).sqs
    dlq = sqs.create_queue(QueueName="copies-dead-letters")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    redrive = {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": MAX_RECEIVE_COUNT}
    queue = sqs.create_queue(QueueName="copies", Attributes={"RedrivePolicy": json.dumps(redrive)})[
        "QueueUrl"
    ]
    monkeypatch.setenv("REPLICATION_QUEUE_URL", queue)
    source = bake(aws, "web-d1")
    throttled = copy_of(source, region=WEST, key=None).model_dump_json()
    left = copy_of(source).model_dump_json()
    for body in (throttled, left):
        sqs.send_message(QueueUrl=queue, MessageBody=body)
    monkeypatch.setattr(ThrottledSlowWest, "tries", 0)
    # moto holds a delayed message back for the real seconds.
    monkeypatch.setattr(replicate, "SEND_AGAIN_DELAY_SECONDS", 0)

    deliver_until_empty(sqs, queue)

    parked = sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10).get("Messages", [])
    # The throttled request was tried on each of its deliveries, then parked, as before.
    assert ThrottledSlowWest.tries == MAX_RECEIVE_COUNT
    assert [m["Body"] for m in parked] == [throttled]
    assert len(copies_in(aws, EU, source.image_id)) == 1


def test_the_worker_refuses_a_copy_to_a_region_without_a_ledger_table(
    aws: ClientFactory, worker_env: Path
) -> None:
    source = bake(aws, "web-8")
    aws(WEST).dynamodb.update_table(TableName="ami-janitor-ledger", DeletionProtectionEnabled=False)
    aws(WEST).dynamodb.delete_table(TableName="ami-janitor-ledger")
    event = sqs_event(
        copy_of(source).model_dump_json(), copy_of(source, region=WEST, key=None).model_dump_json()
    )
    answer = replicate.handler(event, Context())  # type: ignore[arg-type]
    assert answer == {"batchItemFailures": [{"itemIdentifier": "message-1"}]}
    assert len(copies_in(aws, EU, source.image_id)) == 1
    assert copies_in(aws, WEST, source.image_id) == []
    recorded = read(aws, US, source.image_id).ledger
    assert recorded is not None and [c.region for c in recorded.copies] == [EU]


def test_the_worker_copies_nothing_unless_the_policy_is_enforce(aws: ClientFactory, worker_env: Path) -> None:
    worker_env.write_text(json.dumps({**POLICY_DATA, "mode": "paused"}))
    source = bake(aws, "web-5")
    answer = replicate.handler(sqs_event(copy_of(source).model_dump_json()), Context())  # type: ignore[arg-type]
    assert answer == {"batchItemFailures": []}
    assert copies_in(aws, EU, source.image_id) == []


# ---- replication and retirement in the target, run after run ----------------------------------------

# Sources in both regions, copied to eu-west-1 (its own builds encrypted in place there): eu-west-1's
# group holds its own builds and the copies, and the janitor retires there by that group's order.
BOTH_REGIONS: Policy = parse_policy(
    {
        "mode": "enforce",
        "regions": [US, EU],
        "defaults": {"limits": {"max_fraction_per_family": 1.0}},
        "families": [
            {
                "name": "web",
                "match": {"tags": {"Project": "Web"}, "name": "web-*"},
                "latest": {"tag": "Latest"},
                "keep_latest": 2,
                "replicate": [{"region": EU, "kms_key_id": KEY_EU}],
            }
        ],
    }
)


def bake_in(factory: ClientFactory, region: str, name: str, created: datetime) -> Image:
    ec2 = factory(region).ec2
    instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]
    image_id = ec2.create_image(InstanceId=instance["InstanceId"], Name=name)["ImageId"]
    ec2.create_tags(Resources=[image_id], Tags=[{"Key": "Project", "Value": "Web"}])
    emulator.set_image_fields(region, image_id, creation_date=created)
    return read(factory, region, image_id)


def generations_started(factory: ClientFactory, source: Image, region: str) -> list[int]:
    """The generations of copies of `source` to `region` its ledger item records."""
    recorded = read(factory, source.region, source.image_id).ledger
    return [c.generation for c in recorded.copies if c.region == region] if recorded else []


def test_a_copy_the_target_retired_is_not_made_again_run_after_run_until_its_group_would_keep_it(
    aws: ClientFactory,
) -> None:
    start = datetime.now(UTC).replace(microsecond=0)
    s1 = bake_in(aws, US, "web-s1", start - timedelta(days=10))
    s2 = bake_in(aws, US, "web-s2", start - timedelta(days=40))
    e1 = bake_in(aws, EU, "web-e1", start - timedelta(days=5))
    bake_in(aws, EU, "web-e2", start - timedelta(days=35))
    # A copy of s2 made earlier: eu-west-1 keeps e1 and the copy of s1 before it, so the janitor retires it.
    stale = start_copy(aws, copy_of(s2), s2, BOTH_REGIONS)
    assert stale.image_id is not None
    for day in range(0, 42, 7):
        result = engine.run(BOTH_REGIONS, [US, EU], aws, start + timedelta(days=day), apply=True)
        assert not [n for n in result.plan.notes if "not started again" in n], result.plan.notes
        # Each copy planned is one eu-west-1 keeps: e1 encrypted in place, and s1; never s2 again.
        assert sorted((c.source_image_id, c.generation) for c in result.plan.copies) == (
            sorted([(e1.image_id, 1), (s1.image_id, 1)]) if day == 0 else []
        )
    assert aws(EU).ec2.describe_images(ImageIds=[stale.image_id])["Images"] == []  # retired
    assert generations_started(aws, s2, EU) == [1]
    # Nothing eu-west-1 holds of the janitor's copies is a candidate there.
    plan, _ = engine.build_plan(BOTH_REGIONS, [EU], aws, start + timedelta(days=42))
    replicas = [d for d in plan.decisions if d.source_image_id]
    assert len(replicas) == 2 and {d.action for d in replicas} == {"keep"}
    # e1 and its copy are deregistered by hand: eu-west-1 would keep a copy of s2 once more. It is made
    # with the next generation (its retired copy's token is spent), and no failure is reported.
    for replica in replicas:
        if replica.source_image_id == e1.image_id:
            aws(EU).ec2.deregister_image(ImageId=replica.image_id)
    aws(EU).ec2.deregister_image(ImageId=e1.image_id)
    result = engine.run(BOTH_REGIONS, [US, EU], aws, start + timedelta(days=42), apply=True)
    assert [(c.source_image_id, c.generation) for c in result.plan.copies] == [(s2.image_id, 2)]
    assert not [n for n in result.plan.notes if "not started again" in n]
    assert generations_started(aws, s2, EU) == [1, 2]
    assert [raw["State"] for raw in copies_in(aws, EU, s2.image_id)] == ["available"]


def test_a_run_whose_copies_the_queue_did_not_take_reports_them_failed(aws: ClientFactory) -> None:
    """enqueue_copies never raises: it counts what SQS took. Copies it did not take are failures of the
    run (its exit code, ActionsFailed, the summary); the run said nothing of them, the alarm stayed
    quiet, and a lasting queue problem left targets without copies run after run."""
    source = bake(aws, "web-1")

    def took_one(copies: Sequence[Copy]) -> int:
        return 1

    result = engine.run(POLICY, [US], aws, source.created, apply=True, enqueue=took_one)

    assert len(result.plan.copies) == 2
    report = result.report()
    assert (report.copies_queued, report.copies_not_queued) == (1, 1)
    assert report.summary.actions_failed == 1 and result.exit_code == 1
    assert "copies the replication queue did not take (planned again next run): 1" in scheduled.summary_text(
        US, report
    )


def test_a_late_request_for_a_generation_whose_copy_was_deregistered_sends_no_old_token(
    aws: ClientFactory,
) -> None:
    """Generation 1 was made (its id on the source's record), then deregistered. A late delivery of the
    generation-1 request (queued by the event and by a run) sent the old token: EC2 answered with the
    deregistered copy, and the request was acknowledged as a copy started while none existed."""
    source = bake(aws, "web-1")
    first = start_copy(aws, copy_of(source), source, POLICY)
    assert first.started and first.image_id is not None
    aws(EU).ec2.deregister_image(ImageId=first.image_id)
    sent = count_calls(aws(EU).ec2)

    late = engine.start_requested_copy(copy_of(source), POLICY, aws)

    assert (late.status, late.started, late.image_id) == ("skipped", False, None), late
    assert late.detail == (
        f"generation 1's copy {first.image_id} was made and is gone: the next run plans generation 2"
    )
    assert sent["ec2:CopyImage"] == 0


def test_a_copy_image_answer_without_an_image_id_is_a_failed_copy(aws: ClientFactory) -> None:
    """No item is written under no id: the copy failed, to be tried again with the same token."""
    source = bake(aws, "web-1")

    class Ok:
        status_code = 200

    aws(EU).ec2.meta.events.register("before-call.ec2.CopyImage", lambda **_: (Ok(), {"ImageId": ""}))

    result = start_copy(aws, copy_of(source), source, POLICY)

    assert (result.status, result.started, result.error) == (
        "failed",
        False,
        "CopyImage to eu-west-1 answered no image id",
    )


class UnreadableSource(ClientFactory):
    """DescribeImages in the source's region throttled past the SDK's retries: the worker cannot read
    the request's source now."""

    def __call__(self, region: str) -> RegionClients:
        clients = super().__call__(region)
        if region == US:

            def throttled(**_: Any) -> None:
                raise ClientError(
                    {"Error": {"Code": "RequestLimitExceeded", "Message": "Request limit exceeded."}},
                    "DescribeImages",
                )

            clients.ec2.meta.events.register(
                "before-call.ec2.DescribeImages", throttled, unique_id="throttled"
            )
        return clients


def test_a_request_that_fails_before_copy_image_says_why_at_each_delivery(
    aws: ClientFactory, worker_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A request the worker cannot start now (its source unreadable) is a batch item failure, delivered
    again, then parked in the dead-letter queue, which alarms: each delivery logs its reason with the
    message id and counts a failed copy, as a CopyImage that fails does."""
    source = bake(aws, "web-9")
    log = io.StringIO()
    monkeypatch.setattr(replicate.logger.registered_handler, "stream", log)
    monkeypatch.setattr(replicate, "ClientFactory", UnreadableSource)

    answer = replicate.handler(sqs_event(copy_of(source).model_dump_json()), Context())  # type: ignore[arg-type]

    assert answer == {"batchItemFailures": [{"itemIdentifier": "message-0"}]}
    lines = [
        json.loads(line)
        for line in (log.getvalue() + capsys.readouterr().out).splitlines()
        if line.startswith("{")
    ]
    [said] = [line for line in lines if line.get("message") == "copy failed"]
    assert said["message_id"] == "message-0"
    assert "RequestLimitExceeded" in said["error"]
    assert said["request"]["source_image_id"] == source.image_id
    assert sum(sum(line.get("CopiesFailed", [])) for line in lines if "_aws" in line) == 1
    assert copies_in(aws, EU, source.image_id) == []
