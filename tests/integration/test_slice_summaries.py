"""A run's summary may come twice, never not at all: its last slice's sender killed mid-send (a timeout
runs no `except`), or every delivery of its last slice failing to send it (the slice then in the
dead-letter queue, every slice counted), still end in a summary, or a later run's report naming it."""

from __future__ import annotations

import boto3
import pytest
from aws_lambda_powertools.utilities.batch.exceptions import BatchProcessingError
from infra.work_slices import MAX_RECEIVE_COUNT

from ami_janitor.aws.runs import RunRecords, run_key
from ami_janitor.core.policy import DEFAULT_LEDGER_TABLE
from ami_janitor.core.slices import WorkSlice
from ami_janitor.handlers import slices
from integration.test_slices import REGION, SCHEDULED, Deployment, deployed  # noqa: F401


def test_a_run_whose_summary_never_went_out_is_named_by_the_next_run(deployed: Deployment) -> None:  # noqa: F811
    _, bodies = deployed.planned()
    run = WorkSlice.model_validate_json(bodies[0]).run
    # The scheduled run's part never reached the bucket (the run timed out after queueing its slices,
    # say): the last slice cannot make the report, on any delivery.
    deployed.s3.delete_object(Bucket="reports", Key=f"runs/{REGION}/{run}/run.json")
    for body in bodies[:-1]:
        deployed.work(body)
    for delivery in range(1, MAX_RECEIVE_COUNT + 1):  # then SQS parks it in the dead-letter queue
        with pytest.raises(BatchProcessingError):
            deployed.work(bodies[-1], delivery)
    assert deployed.mails() == []
    progress = RunRecords(boto3.client("dynamodb", region_name=REGION), DEFAULT_LEDGER_TABLE).read(
        REGION, run
    )
    assert progress.complete and progress.summary_sent is None

    deployed.next_run_long_after(run)

    [mail] = deployed.mails()
    assert f"unfinished run: {REGION}: run {run}: all its {len(bodies)} slices finished" in mail, mail


class Killed(BaseException):
    """The invocation ends mid-send (Lambda's timeout, an out-of-memory kill): no `except Exception`."""


def killed_while_sending(
    deployed: Deployment,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    bodies: list[str],
    delivery: int = 1,
) -> None:
    """Every slice but the last done; the last one's `delivery` killed while it sends the summary."""
    for body in bodies[:-1]:
        deployed.work(body)
    real = slices.publish

    def killed(*args: object, **kwargs: object) -> None:
        raise Killed()

    monkeypatch.setattr(slices, "publish", killed)
    with pytest.raises(Killed):
        deployed.work(bodies[-1], delivery)
    monkeypatch.setattr(slices, "publish", real)


def test_a_summary_whose_sender_was_killed_mid_send_is_sent_by_the_slices_next_delivery(
    deployed: Deployment,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, bodies = deployed.planned()
    killed_while_sending(deployed, monkeypatch, bodies)

    deployed.work(bodies[0], 2)  # another slice delivered again: the claim is not its to take
    assert deployed.mails() == []
    deployed.work(bodies[-1], 2)  # SQS delivers the last slice again once its visibility times out
    assert len(deployed.mails()) == 1


def test_a_summary_killed_on_its_slices_last_delivery_is_named_by_the_next_run(
    deployed: Deployment,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The last slice's final delivery (its earlier ones failed before it was counted) is killed while
    it sends the run's summary: SQS parks the message in the dead-letter queue, and no delivery takes
    the claim over. The record said the summary was sent, and no run named the run: no summary, ever."""
    _, bodies = deployed.planned()
    run = WorkSlice.model_validate_json(bodies[0]).run
    killed_while_sending(deployed, monkeypatch, bodies, MAX_RECEIVE_COUNT)
    assert deployed.mails() == []

    deployed.next_run_long_after(run)

    [mail] = deployed.mails()
    assert f"run {run}: all its 3 slices finished, but its report and summary could not be sent" in mail


def test_a_summary_sent_is_confirmed_and_no_later_run_names_its_run(deployed: Deployment) -> None:  # noqa: F811
    _, bodies = deployed.planned()
    run = WorkSlice.model_validate_json(bodies[0]).run
    for body in bodies:
        deployed.work(body)
    assert len(deployed.mails()) == 1
    record = boto3.client("dynamodb", region_name=REGION).get_item(
        TableName=DEFAULT_LEDGER_TABLE, Key=run_key(REGION, run)
    )["Item"]
    assert {"summary_sent", "summary_confirms", "summary_confirmed"} <= set(record)

    deployed.next_run_long_after(run)

    assert not any(f"run {run}" in mail for mail in deployed.mails())
