"""The scheduled bake of one family: a versioned image of its build instance, the one its
bake.instance_id pins or else the only live instance carrying its bake.instance_tag, imaged running or
stopped (several such instances are refused: see build_instance).

The CLI's `bake` acts whenever it is called (the user asked by name), but this one is a deployed
automatic action, so it follows the policy mode like every other function: paused does nothing,
dry-run logs what it would bake, enforce bakes. The image is named from the scheduled event's time
(events.BakeEvent), so a repeated delivery of the event meets the image the first made (baker:
CreateImage refuses the duplicate name) and answers with it. It does not wait for the image: the AMI's
`available` event then drives rotation and replication. It runs no stop/start commands, so its role
has no ssm:SendCommand.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ami_janitor.handlers import loading

with loading():
    from aws_lambda_powertools.metrics import MetricUnit

    from ami_janitor import engine
    from ami_janitor.aws.clients import ClientFactory
    from ami_janitor.core.policy import Family, Policy
    from ami_janitor.handlers.events import (
        BadEvent,
        configured,
        parse_bake_event,
    )
    from ami_janitor.handlers.observe import logger, metrics, paused

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext


def baked_family(policy: Policy, name: str) -> Family:
    try:
        family = policy.family(name)
    except KeyError:
        raise BadEvent(f"bake event: family {name!r} is not in the policy") from None
    if family.bake is None:
        raise BadEvent(f"bake event: family {name!r} has no bake section in the policy")
    return family


@logger.inject_lambda_context
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = parse_bake_event(event)
    env, policy = configured()
    if paused(policy, family=request.family):
        return engine.BakeOutcome(mode="paused", family=request.family).model_dump(mode="json")
    family = baked_family(policy, request.family)
    clients = ClientFactory()(env.region)
    # The scheduled time names the bake, so every delivery of one event names the same image.
    scheduled = request.time or datetime.now(UTC)
    outcome = engine.scheduled_bake(policy, family, clients, scheduled.astimezone(UTC).replace(microsecond=0))
    answer = outcome.model_dump(mode="json")
    # LogRecord reserves `name`: the image name is logged as image_name.
    logged = {key if key != "name" else "image_name": value for key, value in answer.items()}
    if outcome.outcome == "not-here":
        logger.info(
            "not baked: the family bakes in other regions",
            extra={**logged, "bake_regions": policy.bake_regions(family)},
        )
        return answer
    if outcome.outcome == "would-bake":
        logger.info("dry-run: would bake", extra={**logged, "create_image": outcome.create_image})
        return answer
    for warning in outcome.warnings:
        logger.warning(warning, extra={"image_id": outcome.image_id})
    metrics.add_metric(name="ImagesBaked", unit=MetricUnit.Count, value=1)
    logger.info("bake started", extra=logged)
    return answer
