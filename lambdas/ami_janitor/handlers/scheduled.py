"""The scheduled run of one region: reconcile Latest, then plan and (in enforce mode) clean up."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ami_janitor.handlers import loading

with loading():
    from aws_lambda_powertools.metrics import MetricUnit

    from ami_janitor import engine
    from ami_janitor.aws.clients import ClientFactory
    from ami_janitor.handlers.events import (
        Environment,
        ScheduledRunResult,
        configured,
        parse_scheduled_event,
    )
    from ami_janitor.handlers.observe import count_done, logger, metrics, paused

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext

    from ami_janitor.core.model import Copy

# The summary mail names this many of each list (tampered tags, policy errors, ...) and cuts each line
# at this many characters; the report in S3 has them all. SNS refuses a message over 256 KiB: an AMI
# that two families match is a policy error of its own, so a large fleet's lists are unbounded.
_LIST_LINES = 20
_LINE_CHARACTERS = 1000


def _listed(prefix: str, items: Sequence[str]) -> list[str]:
    """At most _LIST_LINES lines of `items`, each cut to _LINE_CHARACTERS, then how many more."""
    lines = [_cut(f"{prefix}: {item}") for item in items[:_LIST_LINES]]
    if len(items) > _LIST_LINES:
        lines.append(f"{prefix}: {len(items) - _LIST_LINES} more in the report")
    return lines


def _cut(line: str) -> str:
    return line if len(line) <= _LINE_CHARACTERS else f"{line[: _LINE_CHARACTERS - 3]}..."


def summary_text(region: str, report: engine.RunReport) -> str:
    s = report.summary
    skipped = [r for r in report.regions if r.status == "skipped"]
    lines = [
        f"ami-janitor {report.mode} run in {region} at {report.generated_at}",
        f"images retired: {s.retired}, deprecated: {s.deprecated}, disabled: {s.disabled}, "
        f"rescued: {s.rescued}",
        f"snapshots deleted: {s.snapshots_deleted}, GiB freed (upper bound): {s.gib_freed_max}",
        _cut(
            f"failures: {s.actions_failed}, regions skipped: {', '.join(r.region for r in skipped) or 'none'}"
        ),
        f"janitor tags that disagree with the ledger (reported, not obeyed): {s.tampered}",
    ]
    if s.held_back:
        lines.append(f"held back by a slice's fresh read (planned again next run): {s.held_back}")
    if s.not_run:
        lines.append(
            f"not run: a queued slice was dropped or ran out of time, or another run of the same scheduled "
            f"event had them (see the report's results; planned again by the next enforce run): {s.not_run}"
        )
    if report.copies_not_queued:
        lines.append(
            f"copies the replication queue did not take (planned again next run): {report.copies_not_queued}"
        )
    lines += _listed("unfinished run", report.unfinished_runs)
    lines += _listed("skipped", [f"{r.region}: {r.error}" for r in skipped])
    lines += _listed("usage report problem", report.usage_problems)
    lines += _listed("policy error", report.policy_errors)
    lines += _listed(
        "tampered",
        [f"{t.region} {t.image_id} {t.tag}={t.value!r}, ledger: {t.ledger!r}" for t in report.tampered],
    )
    return "\n".join(lines)


def report_key(region: str, run: str, *, part: str | None = None) -> str:
    """The run's report; with slices queued, the scheduled run's part waits beside it for the last."""
    return f"runs/{region}/{run}/{part}.json" if part else f"runs/{region}/{run}.json"


def publish(
    env: Environment, factory: ClientFactory, report: engine.RunReport, *, waiting: bool = False
) -> int:
    """The report to the bucket and its summary to the topic, where the deploy gives them. A run
    `waiting` for its queued slices leaves only its part in the bucket: its last slice sends the whole.
    Returns how many of the report's unfinished runs are out: all where it is written to the bucket,
    those the mail names where it is only mailed, none otherwise (without a bucket, a waiting run's
    slices only have the run's record to report from, which names no earlier run)."""
    clients = factory(env.region)
    if env.report_bucket:
        clients.s3.put_object(
            Bucket=env.report_bucket,
            Key=report_key(env.region, report.generated_at, part="run" if waiting else None),
            Body=json.dumps(report.model_dump(mode="json"), indent=2).encode(),
            ContentType="application/json",
        )
    if env.topic_arn and not waiting:
        clients.sns.publish(
            TopicArn=env.topic_arn,
            Subject=f"ami-janitor {env.region}: {report.summary.retired} retired"[:100],
            Message=summary_text(env.region, report),
        )
    if env.report_bucket:
        return len(report.unfinished_runs)
    return min(len(report.unfinished_runs), _LIST_LINES) if env.topic_arn and not waiting else 0


def _enqueuer(factory: ClientFactory, region: str, queue: str | None) -> engine.Enqueue | None:
    """Copies go to the replication queue where the deploy gives one; its client is made for a copy
    to queue, not for a run that has none."""
    if not queue:
        return None

    def enqueue(copies: Sequence[Copy]) -> int:
        if not copies:
            return 0
        from ami_janitor.aws import copier

        return copier.enqueue_copies(factory(region).sqs, queue, copies)

    return enqueue


@logger.inject_lambda_context
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    scheduled = parse_scheduled_event(event)
    env, policy = configured()
    if paused(policy):
        return ScheduledRunResult(mode="paused").model_dump(mode="json")
    factory = ClientFactory()
    now = datetime.now(UTC).replace(microsecond=0)
    result = engine.run(
        policy,
        [env.region],
        factory,
        now,
        apply=policy.mode == "enforce",
        enqueue=_enqueuer(factory, env.region, env.replication_queue_url),
        work_queue=env.work_queue_url,
        publish_reports=True,
        event_id=scheduled.id,
        invocation=context.aws_request_id,
    )
    report = result.report()
    summary = report.summary
    metrics.add_metric(name="ActionsFailed", unit=MetricUnit.Count, value=summary.actions_failed)
    metrics.add_metric(name="RegionSkipped", unit=MetricUnit.Count, value=summary.regions_skipped)
    count_done(report.results)
    metrics.add_metric(name="TamperedTags", unit=MetricUnit.Count, value=len(report.tampered))
    for status in report.regions:
        if status.status == "skipped":
            logger.error("region skipped: no decision on a partial inventory", extra={"error": status.error})
    named = publish(env, factory, report, waiting=result.slices_queued > 0)
    # Once the report naming them is out; those it could not name are left for a later run.
    named_keys = result.unfinished_keys[:named]
    engine.mark_unfinished_reported(
        policy, result.model_copy(update={"unfinished_keys": named_keys}), factory, now
    )
    answer = ScheduledRunResult(
        mode=policy.mode, region=env.region, summary=summary, slices_queued=result.slices_queued
    ).model_dump(mode="json")
    logger.info("run done", extra={**answer, "scheduled_at": scheduled.time})
    return answer
