"""The fleet simulator of `make bench` (bench/fleet.py), small: a region's due deregistrations through
several slices, each one invocation of the worker's code with a new pacer that starts empty, on the
in-memory EC2 with the account's token buckets. The bench runs it at 50,000 AMIs."""

from __future__ import annotations

from typing import Any

import fleet
import pytest

import fake_aws
from ami_janitor import engine
from ami_janitor.aws import pacing
from ami_janitor.aws.runs import RunRecords

BUDGET = 30.0  # seconds of paced calls per slice: 150 deregistrations, so 3 slices for 400
# What an invocation may take past its reads and its budget: the first tokens of a pacer that starts
# empty, and the last AMI's calls.
SLACK = 1.0


def test_every_due_ami_goes_once_paced_to_the_bucket_and_no_slice_runs_over() -> None:
    run = fleet.simulate(2_000, 400, budget=BUDGET)
    assert run.planned_deregistrations == 400
    # The scheduled run cut the due stages, recorded them in the run's record, queued them (one batch
    # of three messages) and left its part of the report: no EC2 call.
    assert run.scheduled_calls == {"dynamodb:UpdateItem": 1, "sqs:SendMessageBatch": 1, "s3:PutObject": 1}
    assert run.slices_queued == 3
    assert len(run.invocations) == 3 and [i.amis for i in run.invocations] == [150, 150, 100]
    assert run.once, run.deregister_calls.most_common(3)
    assert run.remaining == 2_000 - 400
    assert run.statuses == {"ok": 400} and run.held == 0
    assert run.refused == 0
    for invocation in run.invocations:
        assert 0 < invocation.reading < invocation.seconds
        assert invocation.seconds <= invocation.reading + BUDGET + SLACK, invocation
    assert run.ratio >= 0.9, (run.rate, run.span)
    assert run.ec2_calls["DeregisterImage"] == 400
    assert run.ledger_writes == 2 * 400  # the deregister stage recorded, then confirmed
    # The run record: each slice counted once, the last one's claim of the summary and its confirmation.
    assert run.calls["dynamodb:UpdateItem"] == run.ledger_writes + 3 + 2
    assert run.calls["s3:PutObject"] == 3 + 1  # each slice's results, then the whole report
    assert run.summaries == run.notifications == 1
    assert run.reported is not None and run.reported.retired == 400


def test_without_a_pacer_the_accounts_buckets_refuse() -> None:
    """The buckets bite: the same slices unpaced, with calls fast enough to outrun the refill."""
    run = fleet.simulate(2_000, 400, budget=BUDGET, latency=0.01, paced=False)
    assert run.refused > 0
    assert run.statuses["failed"] > 0
    assert run.deregistered < 400


def test_amis_in_flight_keep_a_slow_region_at_the_buckets_rate() -> None:
    """At 0.1 s a call, one AMI in flight runs at its four calls' latency (2.5 a second, half the
    bucket); the worker's four in flight (lanes of simulated time) reach the bucket again, and every
    lane's calls still meet the account's buckets in time order (none refused)."""
    alone = fleet.simulate(2_000, 400, budget=BUDGET, latency=0.1, workers=1)
    side_by_side = fleet.simulate(2_000, 400, budget=BUDGET, latency=0.1, workers=4)
    assert alone.ratio < 0.5 and side_by_side.ratio >= 0.85, (alone.ratio, side_by_side.ratio)
    assert side_by_side.once and side_by_side.refused == 0 and side_by_side.statuses == {"ok": 400}
    assert side_by_side.in_time_order


def _capture(monkeypatch: pytest.MonkeyPatch) -> tuple[list[Any], list[fake_aws.AccountRegion]]:
    """The fake the simulation builds, and every account-region whose clients it makes (the scheduled
    run's first, then one per slice), with their calls of the services beside EC2 and the ledger."""
    fakes: list[Any] = []
    regions: list[fake_aws.AccountRegion] = []
    build, account_region = fleet.build_fleet, fleet.account_region

    def building(*args: Any, **kwargs: Any) -> Any:
        made = build(*args, **kwargs)
        fakes.append(made[0])
        return made

    def clients(*args: Any, **kwargs: Any) -> fake_aws.AccountRegion:
        regions.append(account_region(*args, **kwargs))
        return regions[-1]

    monkeypatch.setattr(fleet, "build_fleet", building)
    monkeypatch.setattr(fleet, "account_region", clients)
    return fakes, regions


def test_every_call_of_every_service_is_in_the_calls_per_retired_ami(monkeypatch: pytest.MonkeyPatch) -> None:
    """What each fake counted (EC2, the ledger's writes and reads, and each invocation's other
    services) is what the figures count, the scheduled run's after its plan and the slices'."""
    _, regions = _capture(monkeypatch)
    run = fleet.simulate(2_000, 400, budget=BUDGET)
    made = regions[0].api_calls()  # the fake's EC2 and DynamoDB calls, and the scheduled run's others
    for region in regions[1:]:  # the slices'
        made.update(region.calls)
    uncounted = made - (run.calls + run.scheduled_calls)
    assert not uncounted, (
        f"{sum(uncounted.values())} calls in no figure over {run.deregistered} AMIs: {dict(uncounted)}"
    )
    assert made == run.calls + run.scheduled_calls
    services = {api.split(":")[0] for api in run.calls}
    assert {"ec2", "dynamodb", "ssm", "autoscaling", "batch", "elasticmapreduce", "s3", "sns"} <= services


def test_each_slice_runs_through_the_workers_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each invocation is engine.work_slice on a slice parsed from its queue message: the run record's
    check and count of the slice, the results kept in S3, the last slice's report, the 2-minute
    out_of_time reserve."""
    seen: list[int] = []
    work_slice = engine.work_slice

    def counted(*args: Any, **kwargs: Any) -> Any:
        seen.append(1)
        return work_slice(*args, **kwargs)

    monkeypatch.setattr(engine, "work_slice", counted)
    run = fleet.simulate(2_000, 400, budget=BUDGET)
    assert len(seen) == len(run.invocations), (
        f"engine.work_slice ran {len(seen)} times for {len(run.invocations)} invocations"
    )


def test_the_fakes_dynamodb_serves_the_run_record() -> None:
    """The run record's calls (GetItem, conditional UpdateItem) on the fake table: a slice counted
    once, the summary claimed once."""
    ec2, _ = fleet.build_fleet(10, 2)
    missing = [api for api in ("get_item", "update_item") if not hasattr(ec2.dynamodb, api)]
    assert not missing, f"FakeDynamoDB lacks {missing}"
    records = RunRecords(ec2.dynamodb, ec2.ledger.table)
    run = "2026-11-25T03:00:00Z"
    counts = dict.fromkeys(("snapshots_deleted", "actions_failed", "held_back", "not_run"), 0)
    assert (
        records.start(
            "us-east-1",
            run,
            slices=2,
            plan_summary={"retired": 2},
            counts=counts,
            digests={0: "a", 1: "b"},
            at=fleet.NOW,
        )
        == "recorded"
    )
    assert (
        records.start("us-east-1", run, slices=2, plan_summary={}, counts=counts, digests={}, at=fleet.NOW)
        == "already-recorded"
    )
    assert records.check_slice("us-east-1", run, 1, "b").digests == {0: "a", 1: "b"}
    first = records.finish_slice("us-east-1", run, 0, {**counts, "snapshots_deleted": 1})
    assert first is not None and first.done == {0} and not first.complete
    assert records.finish_slice("us-east-1", run, 0, {**counts, "snapshots_deleted": 1}) is None
    last = records.finish_slice("us-east-1", run, 1, {**counts, "snapshots_deleted": 1})
    assert last is not None and last.complete and last.counts["snapshots_deleted"] == 2
    assert records.claim_summary("us-east-1", run, fleet.NOW, index=1)
    assert not records.claim_summary("us-east-1", run, fleet.NOW, index=0)
    assert records.claim_summary("us-east-1", run, fleet.NOW, index=1, delivery=2)  # its own redelivery
    assert records.read("us-east-1", run).summary_sent is not None
    assert ec2.dynamodb.calls["UpdateItem"] == 8 and ec2.dynamodb.calls["GetItem"] == 2


def test_span_is_the_fakes_clock_from_first_slice_to_last(monkeypatch: pytest.MonkeyPatch) -> None:
    fakes, _ = _capture(monkeypatch)
    run = fleet.simulate(2_000, 400, budget=BUDGET)
    fake = fakes[0]
    first = fake.calls[0].clock  # the first slice's first EC2 call (the scheduled run made none)
    assert abs(run.span - (fake.clock - first).total_seconds()) < 0.2  # the last call's latency at most


def test_a_pacer_faster_than_the_account_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The account's buckets keep aws-facts' table even when the pacer's is wrong (here twice the
    DeregisterImage refill): the simulation then shows refusals, not a pass."""
    wrong = dict(pacing.SIZES)
    wrong["DeregisterImage"] = (100, 10.0)
    monkeypatch.setattr(pacing, "SIZES", wrong)
    run = fleet.simulate(2_000, 400, budget=BUDGET)
    assert run.refused > 0 and run.deregistered < 400
