"""A KMS alias moved between runs, in a family with two source regions. The scheduled plan refuses it
(the last copy of the family to that region was made with another key). So does the `available` event
of a new source in the other source region, whose ledger records no copy there: it leaves the copy to
the scheduled run, which reads every region's records (it queued the copy with the moved key, and the
worker, which checks only that the alias did not move since the copy was planned, made it)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from moto import mock_aws

from ami_janitor import engine
from ami_janitor.aws.clients import ClientFactory
from ami_janitor.core.model import Copy
from ami_janitor.core.policy import Policy, parse_policy
from ami_janitor.demo import emulator
from server import make_ledger
from sessions import botocore_session

US, WEST, EU = "us-east-1", "us-west-2", "eu-west-1"
ALIAS = "alias/web-key"
POLICY: Policy = parse_policy(
    {
        "mode": "enforce",
        "regions": [US, WEST],
        "families": [
            {
                "name": "web",
                "match": {"tags": {"Project": "Web"}, "name": "web-*"},
                "keep_latest": 2,
                "replicate": [{"region": EU, "kms_key_id": ALIAS}],
            }
        ],
    }
)
NOW = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)


@pytest.fixture
def aws(fake_aws_env: None) -> Iterator[ClientFactory]:
    emulator.install()
    with mock_aws():
        make_ledger((US, WEST, EU))
        yield ClientFactory(botocore_session())


def key(aws: ClientFactory, alias: str | None = None) -> str:
    arn = str(aws(EU).kms.create_key(Description="replica key")["KeyMetadata"]["Arn"])
    if alias:
        aws(EU).kms.create_alias(AliasName=alias, TargetKeyId=arn)
    return arn


def bake(aws: ClientFactory, region: str, name: str) -> str:
    ec2 = aws(region).ec2
    instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]
    image_id = str(ec2.create_image(InstanceId=instance["InstanceId"], Name=name)["ImageId"])
    ec2.create_tags(Resources=[image_id], Tags=[{"Key": "Project", "Value": "Web"}])
    return image_id


def copy_requests(aws: ClientFactory) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    def capture(params: dict[str, Any], **_: Any) -> None:
        sent.append(dict(params))

    aws(EU).ec2.meta.events.register("provide-client-params.ec2.CopyImage", capture)
    return sent


def test_a_moved_alias_is_refused_by_the_event_of_another_source_region_too(
    aws: ClientFactory,
) -> None:
    key(aws, ALIAS)
    bake(aws, US, "web-1")
    done = engine.replicate(POLICY, [US], aws, NOW, apply=True)
    assert [r.status for r in done.copy_results] == ["ok"]

    # Someone with kms:UpdateAlias points the alias at a key they control.
    other = key(aws)
    aws(EU).kms.update_alias(AliasName=ALIAS, TargetKeyId=other)

    # A new build in us-west-2 (the family's other source region).
    newer = bake(aws, WEST, "web-2")

    # The scheduled run of us-west-2 (and a replicate by hand) refuses the target: the last copy there
    # was made with the first key.
    planned = engine.replicate(POLICY, [WEST], aws, NOW, apply=False)
    assert planned.copies == []
    assert any("refused" in p and other in p for p in planned.problems), planned.problems

    # The AMI's `available` event in us-west-2.
    queued: list[Copy] = []

    def enqueue(copies: Sequence[Copy]) -> int:
        queued.extend(copies)
        return len(copies)

    outcome = engine.handle_ami_event(
        newer, "available", aws(WEST), POLICY, NOW, enqueue=enqueue, clients_for=aws
    )
    sent = copy_requests(aws)
    results = [engine.start_requested_copy(c, POLICY, aws) for c in queued]

    assert (queued, sent, results) == ([], [], [])
    assert any(
        "recorded in us-west-2's ledger" in s and "the scheduled run" in s for s in outcome.copies_skipped
    ), outcome.copies_skipped
    # The next copy from us-east-1, where the family's copies are recorded, is refused as before.
    bake(aws, US, "web-3")
    assert engine.replicate(POLICY, [US], aws, NOW, apply=False).copies == []
