"""The scheduled bake of one family: a versioned image of its build instance, the one its
bake.instance_id pins or else the only running or stopped instance carrying its bake.instance_tag
(several such instances are refused: see build_instance).

The CLI's `bake` acts whenever it is called (the user asked by name), but this one is a deployed
automatic action, so it follows the policy mode like every other function: paused does nothing,
dry-run logs what it would bake, enforce bakes. It does not wait for the image: the AMI's
`available` event then drives rotation and replication. It runs no stop/start commands, so its role
has no ssm:SendCommand.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from ami_janitor.aws import baker
from ami_janitor.aws.clients import RegionClients
from ami_janitor.core import baking
from ami_janitor.core.policy import Family, Policy, load_policy
from ami_janitor.handlers.events import BadEvent, Environment, parse_bake_event

PERMISSIONS: list[str] = baker.SCHEDULED_PERMISSIONS

logger = Logger()
metrics = Metrics()


def baked_family(policy: Policy, name: str) -> Family:
    try:
        family = policy.family(name)
    except KeyError:
        raise BadEvent(f"bake event: family {name!r} is not in the policy") from None
    if family.bake is None:
        raise BadEvent(f"bake event: family {name!r} has no bake section in the policy")
    return family


def _no_reboot(family: Family) -> bool:
    return family.bake is not None and family.bake.no_reboot


@logger.inject_lambda_context
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = parse_bake_event(event)
    env = Environment.load()
    policy = load_policy(env.config)
    if policy.mode == "paused":
        logger.warning("policy mode is paused: nothing runs", extra={"family": request.family})
        return {"mode": "paused", "family": request.family}
    family = baked_family(policy, request.family)
    clients = RegionClients(env.region)
    now = datetime.now(UTC).replace(microsecond=0)
    instance_id = baker.find_bake_instance(clients, family)
    outcome: dict[str, Any] = {"mode": policy.mode, "region": env.region, "family": family.name}
    if policy.mode == "dry-run":
        # The full request is built (and so checked) without being sent.
        create_image = baking.bake_request(family, instance_id, now, _no_reboot(family))
        logger.info("dry-run: would bake", extra={"create_image": create_image})
        return {**outcome, "outcome": "would-bake", "instance_id": instance_id, "name": create_image["Name"]}
    result = baker.bake(clients, family, instance_id, now, no_reboot=_no_reboot(family), wait=False)
    for warning in result.warnings:
        logger.warning(warning, extra={"image_id": result.image_id})
    metrics.add_metric(name="ImagesBaked", unit=MetricUnit.Count, value=1)
    # LogRecord reserves `name`: the image name is logged as image_name.
    logger.info("bake started", extra={**result.model_dump(exclude={"name"}), "image_name": result.name})
    return {**outcome, "outcome": "baked", **result.model_dump()}
