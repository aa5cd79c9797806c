"""The fleet simulator of `make bench` (bench/fleet.py), small: a region's due deregistrations through
several slices, each one invocation with a new pacer that starts empty, on the in-memory EC2 with the
account's token buckets. The bench runs it at 50,000 AMIs."""

from __future__ import annotations

import fleet

BUDGET = 30.0  # seconds of paced calls per slice: 150 deregistrations, so 3 slices for 400
# What an invocation may take past its reads and its budget: the first tokens of a pacer that starts
# empty, and the last AMI's calls.
SLACK = 1.0


def test_every_due_ami_goes_once_paced_to_the_bucket_and_no_slice_runs_over() -> None:
    run = fleet.simulate(2_000, 400, budget=BUDGET)
    assert run.planned_deregistrations == 400
    assert run.scheduled_calls == 0  # the scheduled run only cut the due stages
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
