"""The organization simulator of `make bench` (bench/org.py), small: an owner and two consumers in two
regions, each account-region's day on its own in-memory EC2 and token buckets, the usage reports through
one inbox. The bench runs it with 99 consumers."""

from __future__ import annotations

import json

import org

from fake_aws import Inbox

REGIONS = ["us-east-1", "eu-west-1"]
GOLDEN = {name: f for f, name in enumerate(org.GOLDEN)}


def golden(region: str, family: str, age: int) -> str:
    return org.image_id(0, org.REGIONS.index(region), GOLDEN[family], age)


def test_the_owner_keeps_what_a_consumer_reports_used_and_retires_what_nobody_uses() -> None:
    result = org.simulate_org(2, REGIONS)

    assert len(result.owner_runs) == 2 and len(result.consumer_runs) == 4
    for run in result.owner_runs:
        region = run.region
        kept_c = run.decisions[golden(region, "golden-c", org.DISABLE_DUE)]
        assert kept_c.action == "keep"
        assert any(
            r.startswith(f"used in account {org.consumer_id(1)} by launch template") for r in kept_c.reasons
        )
        kept_d = run.decisions[golden(region, "golden-d", org.DEREGISTER_DUE)]
        assert kept_d.action == "keep"
        assert any(r.startswith(f"used in account {org.consumer_id(2)} by instance") for r in kept_d.reasons)
        # Consumer 2's Image Builder recipe builds on it.
        kept_b = run.decisions[golden(region, "golden-b", org.DISABLE_DUE)]
        assert kept_b.action == "keep"
        assert any(
            r.startswith(f"used in account {org.consumer_id(2)} by image recipe") for r in kept_b.reasons
        )
        # The same ages of a family nobody uses retire on schedule.
        assert run.disabled == {
            golden(region, family, org.DISABLE_DUE) for family in ("golden-a", "golden-d")
        }
        assert run.gone == {
            golden(region, family, org.DEREGISTER_DUE) for family in ("golden-a", "golden-b", "golden-c")
        }
        # Each consumer's report read from the inbox by the plan, and again by the slice before it acts.
        assert run.calls["s3:GetObject"] == 2 * 2
        assert run.calls["organizations:ListAccounts"] == 1
        assert run.held == {}
    for run in result.runs:
        assert run.refused == 0 and run.tampered == 0 and run.skipped == []
        assert "failed" not in run.statuses
        n = int(run.account) - int(org.OWNER)
        assert len(run.gone) == (3 if n == 0 else len(org.app_families(n)))
        assert len(run.disabled) == (2 if n == 0 else len(org.app_families(n)))


def test_reports_go_through_the_inbox_before_the_owner_reads_them() -> None:
    result = org.simulate_org(2, REGIONS)

    accounts = [org.OWNER, org.consumer_id(1), org.consumer_id(2)]
    assert result.inbox.keys(org.INBOX_BUCKET) == sorted(
        f"org/reports/{account}/{region}.json" for account in accounts for region in REGIONS
    )
    stored = result.inbox.objects[(org.INBOX_BUCKET, f"org/reports/{org.consumer_id(1)}/us-east-1.json")]
    assert stored.writer == org.consumer_id(1)
    uses = json.loads(stored.body)["uses"]
    assert golden("us-east-1", "golden-c", org.DISABLE_DUE) in uses
    assert golden("us-east-1", "golden-a", 1 % 3) in uses  # its launch template and SSM parameter's
    assert all(not ami.startswith("ami-00001") for ami in uses)  # its own AMIs are not reported
    # The model: consumers first, the owner once the last report is in; the day ends with the last run.
    consumers = result.consumer_runs
    assert result.owner_start == max(r.published for r in consumers) > 0
    assert all(r.start == result.owner_start for r in result.owner_runs)
    assert result.day == max(r.end for r in result.runs) > result.owner_start
    # What each invocation took on the simulated clock: the scheduled run, then its slice.
    for run in result.runs:
        assert [i.kind for i in run.invocations] == ["scheduled", "slice"]
        assert run.seconds == sum(i.seconds for i in run.invocations) + org.GAP


def test_without_the_consumers_reports_the_owner_keeps_what_it_shares() -> None:
    """The owner's region run against an empty inbox: every shared AMI stays (fail safe)."""
    organization = org.organization(2)
    policy = org.org_policy(REGIONS, organization)
    area = org.owner_region("us-east-1", Inbox(), organization, org.NOW)

    run = org.run_account_region(area, policy, 0.0)

    assert run.gone == set() and run.disabled == set()
    missing = f"account {org.consumer_id(1)}, which has sent no usage report"
    # A new candidate stays as it is; one the janitor had started on is rescued (its deprecation undone).
    new = run.decisions[golden("us-east-1", "golden-a", org.NEW_CANDIDATE)]
    assert new.action == "keep" and any(missing in r for r in new.reasons)
    started = run.decisions[golden("us-east-1", "golden-a", org.DISABLE_DUE)]
    assert started.action == "rescue" and any(missing in r for r in started.reasons)
    assert area.ec2.images[started.image_id].deprecation_time is None


def test_a_consumer_reports_the_ami_its_image_builder_recipe_builds_on() -> None:
    """Consumer 2 builds on golden-b with Image Builder: its report names the AMI, read from its own
    recipes (one page of each kind, its own and those shared with it)."""
    organization = org.organization(2)
    policy = org.org_policy(REGIONS, organization)
    inbox = Inbox()
    area = org.consumer_region(2, "us-east-1", inbox)

    run = org.run_account_region(area, policy, 0.0)

    # Its own and those shared with it, of each kind.
    assert run.calls["imagebuilder:ListImageRecipes"] == run.calls["imagebuilder:ListContainerRecipes"] == 2
    stored = inbox.objects[(org.INBOX_BUCKET, f"org/reports/{org.consumer_id(2)}/us-east-1.json")]
    uses = json.loads(stored.body)["uses"]
    [detail] = uses[golden("us-east-1", "golden-b", org.DISABLE_DUE)]
    assert detail.startswith("referenced by image recipe arn:aws:imagebuilder:us-east-1:")


def test_a_consumer_whose_recipe_names_the_owners_image_builder_build_reports_its_ami() -> None:
    """Consumer 22's recipe names the owner's Image Builder build of golden-b, not the AMI: its report
    reads the build once (GetImage) and names the AMI it made in the region."""
    organization = org.organization(22)
    policy = org.org_policy(REGIONS, organization)
    inbox = Inbox()
    area = org.consumer_region(22, "us-east-1", inbox)

    run = org.run_account_region(area, policy, 0.0)

    assert run.calls["imagebuilder:GetImage"] == 1
    stored = inbox.objects[(org.INBOX_BUCKET, f"org/reports/{org.consumer_id(22)}/us-east-1.json")]
    report = json.loads(stored.body)
    [detail] = report["uses"][golden("us-east-1", "golden-b", org.DISABLE_DUE)]
    assert detail.endswith(f"(parentImage {org.golden_b_build('us-east-1')})")
    assert "unread" not in report
