"""Bake: a versioned image of a build instance that its own family selects.

The image is named `<family>-<UTC timestamp>` and tagged at creation, on the image and on its
snapshots, with the family's match tags, `Version` (the timestamp) and `ami-janitor:baked-from` (the
instance). With `no_reboot`, EC2 snapshots a running file system: a stop command (SSM Run Command)
quiesces the application first, and the start command runs once CreateImage has returned (the
snapshots are taken from that moment), whatever happened in between.

Waiting for the image polls DescribeImages instead of using the `image_available` waiter: the waiter
has no hook for a progress line per poll, and it gives up on `InvalidAMIID.NotFound`, which EC2 can
answer right after CreateImage (eventual consistency).
"""

import math
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict

from ami_janitor.aws.clients import RegionClients
from ami_janitor.aws.errors import error_code, error_text, is_passing
from ami_janitor.aws.ledger import Ledger
from ami_janitor.core import build_instance
from ami_janitor.core.baking import BakeError, BakeUsageError, bake_request, check_options
from ami_janitor.core.model import BuildInstance, LedgerBake
from ami_janitor.core.policy import DEFAULT_LEDGER_TABLE, Family

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ssm import SSMClient


RUN_SHELL_DOCUMENT = "AWS-RunShellScript"

# What the unattended (scheduled) bake calls: it finds the instance, creates the image and records the
# bake on the new AMI's ledger item, no commands.
SCHEDULED_PERMISSIONS: list[str] = sorted(
    {
        "dynamodb:UpdateItem",  # Ledger.record_bake
        "ec2:CreateImage",
        # Tags given at creation (TagSpecifications) are authorized as ec2:CreateTags.
        "ec2:CreateTags",
        "ec2:DescribeImages",  # a CreateImage retried after its answer was lost: the image it made
        "ec2:DescribeInstances",
    }
)

# Everything bake() may call: the scheduled actions plus waiting for the image and the
# stop/start commands (only the CLI runs those, with the caller's credentials).
PERMISSIONS: list[str] = sorted(
    {
        *SCHEDULED_PERMISSIONS,
        "ec2:DescribeImages",
        "ssm:GetCommandInvocation",
        "ssm:SendCommand",
    }
)

_COMMAND_DONE = "Success"


_COMMAND_FAILED = frozenset({"Cancelled", "TimedOut", "Failed"})

# Run Command's delivery timeout (its minimum is 30 s): an unreachable instance fails the command
# quickly instead of leaving it pending for an hour.
_DELIVERY_TIMEOUT_SECONDS = 60

_IMAGE_WAITING = frozenset({"pending", "transient", "not visible yet"})


_STDERR_TAIL = 400

Progress = Callable[[str], None]


class BakeResult(BaseModel):
    # Off the scheduled run's path: its validator is built when first used, not at each cold start.
    model_config = ConfigDict(defer_build=True, frozen=True)

    family: str
    instance_id: str
    image_id: str
    name: str
    state: str
    warnings: list[str] = []


class Timing(NamedTuple):
    """Polling bounds. Attempts are counted from timeout / delay, so the bounds do not need a clock."""

    command_delay: float = 2.0
    command_timeout: int = 600  # the commands' executionTimeout on the instance, in seconds
    image_delay: float = 15.0
    image_timeout: float = 3600.0  # large volumes take a while to snapshot
    sleep: Callable[[float], None] = time.sleep
    # Looking for the image a retried CreateImage met: DescribeImages may not show it for a few seconds.
    lookup_delays: tuple[float, ...] = (0.0, 2.0, 4.0, 8.0)


def bake(
    clients: RegionClients,
    family: Family,
    instance_id: str,
    now: datetime,
    *,
    no_reboot: bool,
    stop_command: str | None = None,
    start_command: str | None = None,
    wait: bool = True,
    progress: Progress | None = None,
    timing: Timing | None = None,
    ledger_table: str = DEFAULT_LEDGER_TABLE,
) -> BakeResult:
    """Create a versioned image of `instance_id` for `family`; with `wait`, until it is available. The
    bake is recorded on the new AMI's item in the region's ledger (`ledger_table`) once CreateImage
    answers; the caller checks the table is there before (engine.require_ledgers)."""
    warnings = check_options(no_reboot, stop_command, start_command)
    request = bake_request(family, instance_id, now, no_reboot)
    report = progress or _silent
    bounds = timing or Timing()

    def create() -> str:
        report(f"creating image {request['Name']} from {instance_id}")
        image_id = _create_image(clients.ec2, request, bounds)
        _record_bake(Ledger(clients, ledger_table), image_id, instance_id, now)
        return image_id

    if stop_command is None:
        image_id = create()
    else:
        commands = _RunCommand(clients.ssm, instance_id, family.name, bounds, report)
        image_id = _create_quiesced(commands, stop_command, start_command, create)
    state = "pending"
    if wait:
        state = wait_until_available(clients.ec2, image_id, timing=bounds, progress=report)
    return BakeResult(
        family=family.name,
        instance_id=instance_id,
        image_id=image_id,
        name=request["Name"],
        state=state,
        warnings=warnings,
    )


def _silent(line: str) -> None:
    return None


def _create_image(ec2: "EC2Client", request: dict[str, Any], timing: Timing) -> str:
    try:
        answer = ec2.create_image(**request)
    except (ClientError, BotoCoreError) as error:
        failed = f"CreateImage from {request['InstanceId']} failed: {error_text(error)}"
        if error_code(error) != "InvalidAMIName.Duplicate":
            raise BakeError(failed) from None
        made = _made_already(ec2, request, timing, failed)
        if made is None:
            raise BakeError(failed) from None
        return made
    image_id = answer.get("ImageId")
    if not image_id:
        # The image may have been made all the same: found as a repeated request's would be.
        failed = f"CreateImage from {request['InstanceId']} answered no image id"
        made = _made_already(ec2, request, timing, failed)
        if made is None:
            raise BakeError(f"{failed}, and no image {request['Name']} made from it is listed")
        return made
    return str(image_id)


def _made_already(ec2: "EC2Client", request: dict[str, Any], timing: Timing, failed: str) -> str | None:
    """The image a CreateImage refused as a duplicate name made itself. CreateImage has no client
    token: when its answer is lost the SDK sends it again, and the retry meets the image the first
    attempt made under the same name (unique: it holds this bake's timestamp). It is this bake's
    only where EC2 says it was made from this instance (SourceInstanceId): never by a tag, which
    anyone may write on an image of that name. EC2 may not list a new image for a few seconds: it is
    looked for again while none of that name is visible (`timing.lookup_delays`); one made from
    another instance ends the search. A lookup that fails is a BakeError naming both failures."""
    for delay in timing.lookup_delays:
        if delay:
            timing.sleep(delay)
        try:
            answer = ec2.describe_images(
                Owners=["self"], IncludeDisabled=True, Filters=[{"Name": "name", "Values": [request["Name"]]}]
            )
        except (ClientError, BotoCoreError) as error:
            raise BakeError(
                f"{failed}; the image of that name could not be looked up: {error_text(error)}"
            ) from None
        images = answer.get("Images") or []
        for image in images:
            if image.get("SourceInstanceId") == request["InstanceId"]:
                return str(image["ImageId"])
        if images:
            return None
    return None


def _record_bake(ledger: Ledger, image_id: str, instance_id: str, now: datetime) -> None:
    try:
        ledger.record_bake(image_id, LedgerBake(instance_id=instance_id, at=now))
    except (ClientError, BotoCoreError) as error:
        raise BakeError(
            f"{image_id} was created but its bake is not recorded in {ledger.table}: {error_text(error)}",
            image_id=image_id,
        ) from None


class _MaybeSent(BakeError):
    """SendCommand failed in a way that may pass (its answer lost, a 5xx, a throttle): the command may
    have been delivered all the same."""


def _create_quiesced(
    commands: "_RunCommand", stop_command: str, start_command: str | None, create: Callable[[], str]
) -> str:
    """Stop, create, start. Once the stop command was sent, the start command runs whatever happens:
    also where SendCommand's answer was lost (a timeout, a 5xx, a throttle), since the stop command may
    have been delivered all the same (a start of a running application is harmless)."""
    try:
        command_id = commands.send("stop", stop_command)
    except _MaybeSent as error:
        if start_command is None:
            raise
        restart = commands.attempt("start", start_command)
        then = f"then {restart}" if restart is not None else "the start command was run after it"
        raise BakeError(f"{error}; {then}") from error
    try:
        commands.wait("stop", command_id)
        image_id = create()
    except BaseException as error:
        restart = commands.attempt("start", start_command)
        if restart is not None and isinstance(error, BakeError):
            raise BakeError(f"{error}; then {restart}", image_id=error.image_id) from error
        raise
    restart = commands.attempt("start", start_command)
    if restart is not None:
        raise BakeError(f"image {image_id} was created, but {restart}", image_id=image_id)
    return image_id


class _RunCommand:
    """A shell command on the build instance through SSM Run Command, awaited with a bounded poll."""

    def __init__(self, ssm: "SSMClient", instance_id: str, family: str, timing: Timing, progress: Progress):
        self.ssm = ssm
        self.instance_id = instance_id
        self.family = family
        self.timing = timing
        self.progress = progress

    def send(self, purpose: str, command: str) -> str:
        self.progress(f"running the {purpose} command on {self.instance_id}")
        try:
            answer = self.ssm.send_command(
                InstanceIds=[self.instance_id],
                DocumentName=RUN_SHELL_DOCUMENT,
                Comment=f"ami-janitor bake {self.family}: {purpose} command"[:100],
                Parameters={"commands": [command], "executionTimeout": [str(self.timing.command_timeout)]},
                TimeoutSeconds=_DELIVERY_TIMEOUT_SECONDS,
            )
        except (ClientError, BotoCoreError) as error:
            failure = _MaybeSent if is_passing(error) else BakeError
            raise failure(
                f"the {purpose} command could not be sent to {self.instance_id}: {error_text(error)}"
            ) from None
        command_id = (answer.get("Command") or {}).get("CommandId")
        if not command_id:
            # Sent, but not to be followed: it may run all the same (a stop is then followed by the start).
            raise _MaybeSent(
                f"the {purpose} command was sent to {self.instance_id}, but SendCommand answered no command id"
            )
        return str(command_id)

    def wait(self, purpose: str, command_id: str) -> None:
        bound = self.timing.command_timeout + _DELIVERY_TIMEOUT_SECONDS + 30
        attempts = max(1, math.ceil(bound / self.timing.command_delay))
        for attempt in range(attempts):
            if attempt:
                self.timing.sleep(self.timing.command_delay)
            invocation = self._invocation(purpose, command_id)
            status = str(invocation.get("Status") or "not delivered yet")
            if status == _COMMAND_DONE:
                return
            if status in _COMMAND_FAILED:
                raise BakeError(f"the {purpose} command failed on {self.instance_id}: {_outcome(invocation)}")
            self.progress(f"{purpose} command on {self.instance_id}: {status}")
        raise BakeError(
            f"the {purpose} command on {self.instance_id} did not finish within {bound} s (command {command_id})"
        )

    def run(self, purpose: str, command: str) -> None:
        self.wait(purpose, self.send(purpose, command))

    def attempt(self, purpose: str, command: str | None) -> BakeError | None:
        """Run a command if there is one; its failure is returned, not raised."""
        if command is None:
            return None
        try:
            self.run(purpose, command)
        except BakeError as error:
            return error
        return None

    def _invocation(self, purpose: str, command_id: str) -> dict[str, Any]:
        """The invocation as SSM reports it now; {} where it cannot say yet: not recorded yet (normal
        for a moment after SendCommand), or an answer that may pass (a throttle, a 5xx, a lost answer):
        the command is followed on to its end within the bound, never taken as ended (the start
        command would then run beside a stop command still running, and end first)."""
        try:
            answer = self.ssm.get_command_invocation(CommandId=command_id, InstanceId=self.instance_id)
        except (ClientError, BotoCoreError) as error:
            code = error.response.get("Error", {}).get("Code") if isinstance(error, ClientError) else None
            if code == "InvocationDoesNotExist" or is_passing(error):
                return {}
            raise BakeError(
                f"the {purpose} command on {self.instance_id} cannot be followed: {error_text(error)}"
            ) from None
        return dict(answer)


def _outcome(invocation: dict[str, Any]) -> str:
    parts = [str(invocation.get("StatusDetails") or invocation.get("Status"))]
    code = invocation.get("ResponseCode")
    if code is not None and code != -1:
        parts.append(f"exit code {code}")
    stderr = str(invocation.get("StandardErrorContent") or "").strip()
    if stderr:
        parts.append(f"stderr: {stderr[-_STDERR_TAIL:]}")
    return ", ".join(parts)


def wait_until_available(
    ec2: "EC2Client", image_id: str, *, timing: Timing | None = None, progress: Progress | None = None
) -> str:
    """Poll until the image is available; `failed` (or any end state) is a BakeError with its reason."""
    bounds = timing or Timing()
    report = progress or _silent
    attempts = max(1, math.ceil(bounds.image_timeout / bounds.image_delay))
    for attempt in range(attempts):
        if attempt:
            bounds.sleep(bounds.image_delay)
        image = _image(ec2, image_id)
        state = str(image.get("State") or "not visible yet")
        elapsed = _duration(attempt * bounds.image_delay)
        report(f"{image_id}: {state} ({elapsed})")
        if state == "available":
            return state
        if state not in _IMAGE_WAITING:
            reason = (image.get("StateReason") or {}).get("Message") or "no reason given"
            raise BakeError(f"image {image_id} is {state}: {reason}", image_id=image_id)
    raise BakeError(
        f"image {image_id} is not available after {_duration(bounds.image_timeout)}; it may still "
        "become available (aws ec2 wait image-available)",
        image_id=image_id,
    )


def _image(ec2: "EC2Client", image_id: str) -> dict[str, Any]:
    try:
        answer = ec2.describe_images(ImageIds=[image_id])
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") == "InvalidAMIID.NotFound":
            return {}
        raise BakeError(f"cannot read image {image_id}: {error_text(error)}", image_id=image_id) from None
    except BotoCoreError as error:
        raise BakeError(f"cannot read image {image_id}: {error}", image_id=image_id) from None
    images = answer.get("Images") or []
    return dict(images[0]) if images else {}


def _duration(seconds: float) -> str:
    whole = int(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"


def find_bake_instance(clients: RegionClients, family: Family) -> str:
    """The instance the family's bake images (see build_instance.choose); BakeError when it refuses."""
    bake = family.bake
    if bake is None:
        raise BakeUsageError(
            f"family {family.name} has no bake section (bake.instance_id or bake.instance_tag names its "
            "instance); pass --instance-id"
        )
    try:
        if bake.instance_id is not None:
            found = _instance_by_id(clients.ec2, bake.instance_id)
        else:
            found = _instances_tagged(clients.ec2, bake.instance_tag or {})
    except (ClientError, BotoCoreError) as error:
        raise BakeError(f"cannot list the build instances of {family.name}: {error_text(error)}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as error:  # an instance without its id, say
        raise BakeError(
            f"cannot list the build instances of {family.name}: DescribeInstances answered a malformed "
            f"instance ({type(error).__name__}: {error})"
        ) from None
    choice = build_instance.choose(family, clients.region, found)
    if choice.instance_id is None:
        raise BakeError(choice.reason)
    return choice.instance_id


def _instance_by_id(ec2: "EC2Client", instance_id: str) -> list[BuildInstance]:
    try:
        pages = list(ec2.get_paginator("describe_instances").paginate(InstanceIds=[instance_id]))
    except ClientError as error:
        if str(error.response.get("Error", {}).get("Code", "")).startswith("InvalidInstanceID."):
            return []
        raise
    return _build_instances(pages)


def _instances_tagged(ec2: "EC2Client", tags: dict[str, str]) -> list[BuildInstance]:
    filters: list[Any] = [{"Name": f"tag:{key}", "Values": [value]} for key, value in sorted(tags.items())]
    filters.append({"Name": "instance-state-name", "Values": sorted(build_instance.LIVE_STATES)})
    return _build_instances(ec2.get_paginator("describe_instances").paginate(Filters=filters))


def _build_instances(pages: Iterable[Any]) -> list[BuildInstance]:
    return [
        BuildInstance.from_api(dict(instance))
        for page in pages
        for reservation in page.get("Reservations") or []
        for instance in reservation.get("Instances") or []
    ]
