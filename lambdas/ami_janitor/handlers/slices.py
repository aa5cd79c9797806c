"""The slice worker: one slice of a run's due stages per message of the work queue.

The queue is FIFO with one message group per region, so a region's slices run one after the other
(no reserved concurrency: that would throttle the poller into the DLQ instead). Each slice reads its
AMIs again and acts on those nothing put in doubt since the plan (engine.work_slice); its results go
to the report bucket before the run's record counts it, and the worker that completes the run sends
the run's one report and summary. A slice that cannot read its AMIs fails: SQS delivers it again, and
after the queue's maxReceiveCount parks it in the dead-letter queue (which alarms).
"""

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ami_janitor.handlers import SQS_WORKER_MODULES, loading

with loading(*SQS_WORKER_MODULES):
    from aws_lambda_powertools.metrics import MetricUnit
    from aws_lambda_powertools.utilities.batch import SqsFifoPartialProcessor, process_partial_response
    from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
    from aws_lambda_powertools.utilities.parser.models import SqsRecordModel
    from aws_lambda_powertools.utilities.typing import LambdaContext
    from pydantic import Json, ValidationError

    from ami_janitor import engine
    from ami_janitor.aws.clients import ClientFactory, RegionClients
    from ami_janitor.aws.runs import RunNotStarted, SliceNotRecorded
    from ami_janitor.aws.slicer import SliceOutcome
    from ami_janitor.core.policy import Policy
    from ami_janitor.core.slices import WorkSlice
    from ami_janitor.handlers.events import Environment, check_sqs_batch, configured
    from ami_janitor.handlers.observe import count_done, logger, metrics, paused
    from ami_janitor.handlers.scheduled import publish, report_key

# The worker's timeout (the stack sets it; the fleet simulator runs each slice within it).
WORKER_TIMEOUT_SECONDS = 15 * 60
# No AMI is started with less than this left of the invocation (an AMI's stages take seconds; the
# results still go to the bucket and the run's record after the last).
RESERVE_MILLIS = 120_000


class WorkSliceRecord(SqsRecordModel):
    """A record of the work queue: its body is a slice's JSON."""

    body: Json[WorkSlice]


def slice_key(region: str, run: str, index: int) -> str:
    return f"runs/{region}/{run}/slice-{index:05d}.json"


def slice_keeper(env: Environment, clients: RegionClients) -> Callable[[SliceOutcome], None]:
    """What a slice does with its outcome: its part of the run's report, in the report bucket."""

    def keep(outcome: SliceOutcome) -> None:
        if env.report_bucket:
            clients.s3.put_object(
                Bucket=env.report_bucket,
                Key=slice_key(outcome.region, outcome.run, outcome.index),
                Body=outcome.model_dump_json(indent=2).encode(),
                ContentType="application/json",
            )

    return keep


def _read(clients: RegionClients, bucket: str, key: str) -> Any:
    return json.loads(clients.s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def run_report(env: Environment, clients: RegionClients, outcome: SliceOutcome) -> engine.RunReport:
    """The run's one report: the scheduled run's part and every slice's, from the report bucket."""
    assert outcome.progress is not None
    if not env.report_bucket:
        return engine.recorded_report(outcome.region, outcome.run, outcome.progress)
    first = engine.RunReport.model_validate(
        _read(clients, env.report_bucket, report_key(outcome.region, outcome.run, part="run"))
    )
    parts = [
        SliceOutcome.model_validate(
            _read(clients, env.report_bucket, slice_key(outcome.region, outcome.run, index))
        )
        for index in range(outcome.count)
    ]
    return engine.final_report(first, parts, outcome.progress)


def slice_record(
    record: WorkSliceRecord, env: Environment, policy: Policy, factory: ClientFactory, context: LambdaContext
) -> dict[str, Any]:
    clients = factory(env.region)
    try:
        outcome = engine.work_slice(
            policy,
            record.body,
            clients,
            datetime.now(UTC).replace(microsecond=0),
            keep=slice_keeper(env, clients),
            out_of_time=lambda: context.get_remaining_time_in_millis() < RESERVE_MILLIS,
            delivery=int(record.attributes.ApproximateReceiveCount),
        )
    except (SliceNotRecorded, RunNotStarted) as refused:
        # On every delivery: the last is the message the dead-letter queue keeps (and alarms on).
        logger.error(
            "slice refused",
            extra={
                "reason": str(refused),
                "message_id": record.messageId,
                "receive_count": record.attributes.ApproximateReceiveCount,
            },
        )
        metrics.add_metric(name="SlicesRefused", unit=MetricUnit.Count, value=1)
        raise
    failed = sum(1 for r in outcome.results if r.status == "failed")
    metrics.add_metric(name="ActionsFailed", unit=MetricUnit.Count, value=failed)
    metrics.add_metric(name="SliceHeldBack", unit=MetricUnit.Count, value=len(outcome.held))
    count_done(outcome.results)
    answer = {
        "region": outcome.region,
        "run": outcome.run,
        "slice": f"{outcome.index + 1} of {outcome.count}",
        "results": len(outcome.results),
        "failed": failed,
        "held_back": len(outcome.held),
        "dropped": outcome.dropped,
        "last": outcome.last,
    }
    logger.info("slice done", extra=answer)
    if outcome.last:

        def send() -> None:
            report = run_report(env, clients, outcome)
            publish(env, factory, report)
            logger.info("run done", extra={"run": outcome.run, "summary": report.summary.model_dump()})

        engine.send_run_summary(policy, clients, outcome, send)
    return answer


@logger.inject_lambda_context
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    check_sqs_batch(event, "work queue")
    env, policy = configured()
    if paused(policy, dropped=len(event["Records"])):
        # The kill switch: nothing is written. The slices are consumed; an enforce run plans again.
        return {"batchItemFailures": []}
    factory = ClientFactory(burst=False)
    # FIFO: the first record that fails fails the records after it too (they come again, in order).
    # Each record is parsed in its own handling, where a malformed one fails itself: given a model, the
    # processor parses the records after a failure outside its guard, and one malformed there failed
    # the whole batch (the records done before it came again).
    processor = SqsFifoPartialProcessor()
    return process_partial_response(
        event=event,
        record_handler=lambda record: slice_record(_parsed(record.raw_event), env, policy, factory, context),
        processor=processor,
        context=context,
    )


def _parsed(raw: dict[str, Any]) -> WorkSliceRecord:
    try:
        return WorkSliceRecord.model_validate(raw)
    except ValidationError as error:
        logger.error("malformed slice", extra={"message_id": raw.get("messageId"), "error": str(error)})
        raise
