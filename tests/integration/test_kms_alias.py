"""A replica key named by an alias: resolved in the target region, CopyImage given the key ARN, the key
recorded with the copy, a redirected or unresolvable alias refused or skipped with the reason."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from ami_janitor import engine
from ami_janitor.aws import inventory
from ami_janitor.aws.clients import ClientFactory
from ami_janitor.core.model import Copy
from ami_janitor.core.policy import Policy, parse_policy
from ami_janitor.core.replication import RefusedCopy
from ami_janitor.demo import emulator
from server import make_ledger
from sessions import botocore_session

US, WEST, EU = "us-east-1", "us-west-2", "eu-west-1"
ALIAS = "alias/web-key"
POLICY: Policy = parse_policy(
    {
        "mode": "enforce",
        "regions": [US],
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
# The same family with a second source region.
TWO_SOURCES: Policy = POLICY.model_copy(update={"regions": [US, WEST]})
NOW = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)


@pytest.fixture
def aws(fake_aws_env: None) -> Iterator[ClientFactory]:
    emulator.install()
    with mock_aws():
        make_ledger((US, WEST, EU))
        yield ClientFactory(botocore_session())  # a full SDK: the tests make resources the janitor never does


def key(aws: ClientFactory, alias: str | None = None) -> str:
    """A new key in eu-west-1 (its ARN); with `alias`, the alias is created for it."""
    arn = str(aws(EU).kms.create_key(Description="replica key")["KeyMetadata"]["Arn"])
    if alias:
        aws(EU).kms.create_alias(AliasName=alias, TargetKeyId=arn)
    return arn


def bake(aws: ClientFactory, name: str, region: str = US) -> str:
    ec2 = aws(region).ec2
    instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]
    image_id = str(ec2.create_image(InstanceId=instance["InstanceId"], Name=name)["ImageId"])
    ec2.create_tags(Resources=[image_id], Tags=[{"Key": "Project", "Value": "Web"}])
    return image_id


def copy_requests(aws: ClientFactory) -> list[dict[str, Any]]:
    """Every CopyImage request made in eu-west-1 from now on, as sent (moto ignores KmsKeyId)."""
    sent: list[dict[str, Any]] = []

    def capture(params: dict[str, Any], **_: Any) -> None:
        sent.append(dict(params))

    aws(EU).ec2.meta.events.register("provide-client-params.ec2.CopyImage", capture)
    return sent


def replicate(aws: ClientFactory) -> engine.ReplicateResult:
    return engine.replicate(POLICY, [US], aws, NOW, apply=True)


def test_an_alias_is_resolved_and_copyimage_gets_the_key_arn(aws: ClientFactory) -> None:
    arn = key(aws, ALIAS)
    source = bake(aws, "web-1")
    sent = copy_requests(aws)
    result = replicate(aws)
    [copy] = result.copies
    # The plan shows both: the alias the policy names and the key it resolved to.
    assert (copy.kms_key_id, copy.kms_key_arn) == (ALIAS, arn)
    assert [r.status for r in result.copy_results] == ["ok"]
    [request] = sent
    assert (request["SourceImageId"], request["Encrypted"], request["KmsKeyId"]) == (source, True, arn)
    # The ledger records the key ARN with the copy, on the source and on the replica.
    item = inventory.read_ledger_items(aws(US), "ami-janitor-ledger", [source])
    assert item is not None
    [record] = item.items[source].copies
    assert (record.family, record.kms_key_id, record.kms_key_arn) == ("web", ALIAS, arn)
    assert record.started is not None


def test_an_alias_moved_to_another_key_is_refused_and_reported(aws: ClientFactory) -> None:
    first = key(aws, ALIAS)
    bake(aws, "web-1")
    assert [r.status for r in replicate(aws).copy_results] == ["ok"]
    # Someone with kms:UpdateAlias points the alias at a key they control.
    other = key(aws)
    aws(EU).kms.update_alias(AliasName=ALIAS, TargetKeyId=other)
    newer = bake(aws, "web-2")
    sent = copy_requests(aws)
    result = replicate(aws)
    assert result.copies == [] and sent == []
    [refusal] = [p for p in result.problems if "refused" in p]
    assert refusal.startswith(
        f"family web: replicate target {EU} ({ALIAS}) refused: the alias now resolves to {other}"
    )
    assert f"was made with {first}" in refusal
    # The plan of a scheduled run says the same.
    plan, _ = engine.build_plan(POLICY, [US], aws, NOW)
    assert plan.copies == [] and refusal in plan.notes
    # Pointed back at the recorded key, the copy is made again.
    aws(EU).kms.update_alias(AliasName=ALIAS, TargetKeyId=first)
    again = replicate(aws)
    assert [(c.source_image_id, c.kms_key_arn) for c in again.copies] == [(newer, first)]


def test_an_alias_that_does_not_exist_skips_its_target(aws: ClientFactory) -> None:
    bake(aws, "web-1")
    sent = copy_requests(aws)
    result = replicate(aws)
    assert result.copies == [] and result.copy_results == [] and sent == []
    [problem] = result.problems
    assert problem.startswith(
        f"family web: replicate target {EU} ({ALIAS}) skipped: cannot resolve it in {EU} ("
    )
    assert "NotFoundException" in problem and "\n" not in problem


def test_an_alias_the_role_may_not_describe_skips_its_target(aws: ClientFactory) -> None:
    key(aws, ALIAS)
    bake(aws, "web-1")

    def denied(**_: Any) -> None:
        raise ClientError(
            {"Error": {"Code": "AccessDeniedException", "Message": "not allowed"}}, "DescribeKey"
        )

    aws(EU).kms.meta.events.register("before-call.kms.DescribeKey", denied)
    sent = copy_requests(aws)
    result = replicate(aws)
    assert result.copies == [] and sent == []
    assert result.problems == [
        f"family web: replicate target {EU} ({ALIAS}) skipped: cannot resolve it in {EU} "
        "(AccessDeniedException: not allowed); not copied"
    ]


@pytest.mark.parametrize("answer", [{}, {"KeyMetadata": {"KeyId": "1234", "KeyState": "Enabled"}}])
def test_a_describe_key_answer_naming_no_key_skips_its_target(aws: ClientFactory, answer: Any) -> None:
    """A malformed DescribeKey answer (no KeyMetadata, or no Arn in it) skips the alias's target with
    the reason, as an alias that cannot be resolved does: the run goes on (it raised a KeyError)."""
    key(aws, ALIAS)
    bake(aws, "web-1")

    class Ok:
        status_code = 200

    aws(EU).kms.meta.events.register("before-call.kms.DescribeKey", lambda **_: (Ok(), answer))
    sent = copy_requests(aws)
    result = replicate(aws)
    assert result.copies == [] and sent == []
    assert result.problems == [
        f"family web: replicate target {EU} ({ALIAS}) skipped: DescribeKey in {EU} answered no key ARN; "
        "not copied"
    ]


def test_the_worker_refuses_a_copy_whose_alias_moved_since_it_was_planned(aws: ClientFactory) -> None:
    key(aws, ALIAS)
    bake(aws, "web-1")
    [planned] = engine.replicate(POLICY, [US], aws, NOW, apply=False).copies
    aws(EU).kms.update_alias(AliasName=ALIAS, TargetKeyId=key(aws))
    sent = copy_requests(aws)
    with pytest.raises(RefusedCopy, match=f"resolves to .* now, not to {planned.kms_key_arn}"):
        engine.start_requested_copy(planned, POLICY, aws)
    assert sent == []
    # A request for an alias target without the key it was planned with is refused too.
    with pytest.raises(RefusedCopy):
        engine.start_requested_copy(planned.model_copy(update={"kms_key_arn": None}), POLICY, aws)


@pytest.mark.parametrize(
    ("code", "status"),
    [("ThrottlingException", 400), ("KMSInternalException", 500), ("DependencyTimeoutException", 503)],
)
def test_the_worker_fails_for_now_not_refuses_a_copy_when_describe_key_fails_for_a_while(
    aws: ClientFactory, code: str, status: int
) -> None:
    """A DescribeKey throttled or failing on KMS's side (after the SDK's retries) says nothing about the
    policy: the request is a copy that failed for now (CopiesFailed, tried again), not one the policy
    would not make (refused: `copy request refused`, CopyRequestsRefused)."""
    key(aws, ALIAS)
    bake(aws, "web-1")
    [planned] = engine.replicate(POLICY, [US], aws, NOW, apply=False).copies

    def unavailable(**_: Any) -> None:
        raise ClientError(
            {"Error": {"Code": code, "Message": "try again"}, "ResponseMetadata": {"HTTPStatusCode": status}},
            "DescribeKey",
        )

    aws(EU).kms.meta.events.register("before-call.kms.DescribeKey", unavailable)
    sent = copy_requests(aws)

    result = engine.start_requested_copy(planned, POLICY, aws)

    assert result.status == "failed" and sent == []
    assert result.error == f"{ALIAS}: cannot resolve it in {EU} now ({code}: try again)"


def test_the_worker_makes_the_copy_planned_after_the_alias_is_named_again(aws: ClientFactory) -> None:
    """The README's way to move a replica key: the alias names key A; the policy names key B's ARN, and
    a copy is made with B; the alias, moved to B, is named again. An older source whose copy (made with
    A) was deregistered by hand is planned again with B, the key of the family's last copy there: the
    worker makes it. (It read only this source's records, found A, and refused every delivery of it to
    the dead-letter queue.)"""
    key_a = key(aws, ALIAS)
    older = bake(aws, "web-1")
    assert [r.status for r in engine.replicate(POLICY, [US], aws, NOW, apply=True).copy_results] == ["ok"]

    key_b = key(aws)
    by_arn = _with_key(key_b)
    bake(aws, "web-2")
    later = NOW + timedelta(days=1)
    assert [r.status for r in engine.replicate(by_arn, [US], aws, later, apply=True).copy_results] == ["ok"]

    aws(EU).kms.update_alias(AliasName=ALIAS, TargetKeyId=key_b)
    [first_copy] = [
        i["ImageId"]
        for i in aws(EU).ec2.describe_images(Owners=["self"])["Images"]
        if i.get("SourceImageId") == older
    ]
    aws(EU).ec2.deregister_image(ImageId=first_copy)  # by hand: no retirement the ledger records
    [planned] = engine.replicate(POLICY, [US], aws, later + timedelta(days=1), apply=False).copies
    assert (planned.source_image_id, planned.generation, planned.kms_key_arn) == (older, 2, key_b)
    assert key_a != key_b

    sent = copy_requests(aws)
    engine.start_requested_copy(planned, POLICY, aws)
    [request] = sent
    assert (request["SourceImageId"], request["KmsKeyId"]) == (older, key_b)


def _with_key(arn: str) -> Policy:
    """POLICY with its target's key named by ARN."""
    raw = POLICY.model_dump(mode="json", exclude_defaults=True)
    raw["families"][0]["replicate"][0]["kms_key_id"] = arn
    return parse_policy(raw)


def test_a_moved_alias_is_refused_by_the_event_of_another_source_region_too(aws: ClientFactory) -> None:
    """In a family with two source regions, the `available` event of a new source in the other one,
    whose ledger records no copy to the target, leaves the copy to the scheduled run, which reads every
    region's records (it queued the copy with the moved key, and the worker, which checks only that the
    alias did not move since the copy was planned, made it)."""
    key(aws, ALIAS)
    bake(aws, "web-1")
    done = engine.replicate(TWO_SOURCES, [US], aws, NOW, apply=True)
    assert [r.status for r in done.copy_results] == ["ok"]

    # Someone with kms:UpdateAlias points the alias at a key they control.
    other = key(aws)
    aws(EU).kms.update_alias(AliasName=ALIAS, TargetKeyId=other)

    # A new build in us-west-2 (the family's other source region).
    newer = bake(aws, "web-2", WEST)

    # The scheduled run of us-west-2 (and a replicate by hand) refuses the target: the last copy there
    # was made with the first key.
    planned = engine.replicate(TWO_SOURCES, [WEST], aws, NOW, apply=False)
    assert planned.copies == []
    assert any("refused" in p and other in p for p in planned.problems), planned.problems

    # The AMI's `available` event in us-west-2.
    queued: list[Copy] = []

    def enqueue(copies: Sequence[Copy]) -> int:
        queued.extend(copies)
        return len(copies)

    outcome = engine.handle_ami_event(
        newer, "available", aws(WEST), TWO_SOURCES, NOW, enqueue=enqueue, clients_for=aws
    )
    sent = copy_requests(aws)
    results = [engine.start_requested_copy(c, TWO_SOURCES, aws) for c in queued]

    assert (queued, sent, results) == ([], [], [])
    assert any(
        "recorded in us-west-2's ledger" in s and "the scheduled run" in s for s in outcome.copies_skipped
    ), outcome.copies_skipped
    # The next copy from us-east-1, where the family's copies are recorded, is refused as before.
    bake(aws, "web-3")
    assert engine.replicate(TWO_SOURCES, [US], aws, NOW, apply=False).copies == []
