"""Bake without AWS: the name, tags and exact CreateImage request, and botocore's Stubber for the call
sequences moto cannot show (NoReboot and snapshot tags as sent, Run Command around CreateImage, image
states on the way to available)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from ami_janitor.aws import baker
from ami_janitor.aws.clients import RegionClients
from ami_janitor.core import baking
from ami_janitor.core.policy import Bake, Family, Match, PolicyError, parse_policy
from builders import ledger_write

REGION = "us-east-1"
NOW = datetime(2026, 11, 25, 3, 0, 0, tzinfo=UTC)
INSTANCE = "i-0123456789abcdef0"
IMAGE = "ami-0123456789abcdef0"
STOP = "sudo systemctl stop pettracker-ml"
START = "sudo systemctl start pettracker-ml"
# Run Command ids are UUIDs (the Stubber checks the length).
STOP_ID = "11111111-2222-3333-4444-555555555555"
START_ID = "66666666-7777-8888-9999-000000000000"
TAGS = [
    {"Key": "Project", "Value": "PetTracker"},
    {"Key": "Version", "Value": "20261125T030000Z"},
    {"Key": "ami-janitor:baked-from", "Value": INSTANCE},
]
CREATE_IMAGE = {
    "InstanceId": INSTANCE,
    "Name": "pettracker-ml-20261125T030000Z",
    "Description": f"pettracker-ml 20261125T030000Z baked by ami-janitor from {INSTANCE}",
    "NoReboot": True,
    "TagSpecifications": [
        {"ResourceType": "image", "Tags": TAGS},
        {"ResourceType": "snapshot", "Tags": TAGS},
    ],
}


def family(**match: Any) -> Family:
    data = {
        "regions": [REGION],
        "families": [
            {
                "name": "pettracker-ml",
                "match": match or {"tags": {"Project": "PetTracker"}, "name": "pettracker-ml-*"},
                "bake": {"instance_tag": {"Role": "pettracker-ml"}},
            }
        ],
    }
    return parse_policy(data).families[0]


# ---- name, tags, request -------------------------------------------------------------------------------


def test_the_name_is_the_family_and_the_utc_timestamp() -> None:
    assert baking.image_name(family(), NOW) == "pettracker-ml-20261125T030000Z"
    # Any time zone is written in UTC; a naive time is taken as UTC.
    east = timezone(timedelta(hours=5))
    assert baking.image_name(family(), datetime(2026, 11, 25, 8, 0, 0, tzinfo=east)).endswith("T030000Z")
    assert baking.version(datetime(2026, 11, 25, 3, 0, 0)) == "20261125T030000Z"


def test_a_name_glob_that_would_not_select_the_bake_is_refused() -> None:
    # The policy refuses such a family when it loads (test_policy.py); the bake checks again.
    with pytest.raises(PolicyError, match=r"match.name 'pettracker-ml-v\*' does not select"):
        family(tags={"Project": "PetTracker"}, name="pettracker-ml-v*")
    unchecked = family().model_copy(
        update={"match": Match(tags={"Project": "PetTracker"}, name="pettracker-ml-v*")}
    )
    with pytest.raises(baking.BakeUsageError, match=r"match.name 'pettracker-ml-v\*' does not match"):
        baking.image_name(unchecked, NOW)
    # Without a name glob the tags select it.
    assert baking.image_name(family(tags={"Project": "PetTracker"}), NOW) == "pettracker-ml-20261125T030000Z"


def test_match_tags_on_a_key_the_bake_sets_are_refused() -> None:
    with pytest.raises(baking.BakeUsageError, match=r"match\.tags select on Version"):
        baking.bake_request(family(tags={"Version": "1.0"}), INSTANCE, NOW, no_reboot=False)


def test_the_create_image_request_tags_the_image_and_its_snapshots() -> None:
    assert baking.bake_request(family(), INSTANCE, NOW, no_reboot=True) == CREATE_IMAGE
    assert baking.bake_request(family(), INSTANCE, NOW, no_reboot=False)["NoReboot"] is False


@pytest.mark.parametrize(
    ("no_reboot", "stop", "start", "message"),
    [
        (False, STOP, START, "quiesce the application for --no-reboot"),
        (False, None, START, "quiesce the application for --no-reboot"),
        (True, None, START, "--start-command needs --stop-command"),
        (True, "  ", None, "--stop-command: the command is empty"),
    ],
)
def test_command_options_that_make_no_sense_are_refused(
    no_reboot: bool, stop: str | None, start: str | None, message: str
) -> None:
    with pytest.raises(baking.BakeUsageError, match=message):
        baking.check_options(no_reboot, stop, start)


def test_no_reboot_warns_unless_a_stop_command_quiesces_the_application() -> None:
    assert baking.check_options(True, None, None) == [baking.NO_REBOOT_WARNING]
    assert baking.check_options(True, STOP, START) == []
    assert baking.check_options(True, STOP, None) == []
    assert baking.check_options(False, None, None) == []


# ---- Stubber ----------------------------------------------------------------------------------------------


class Stubbed:
    def __init__(self) -> None:
        self.ec2_client = boto3.client(
            "ec2", region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing"
        )
        self.ssm_client = boto3.client(
            "ssm", region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing"
        )
        self.dynamodb_client = boto3.client(
            "dynamodb", region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing"
        )
        self.ec2 = Stubber(self.ec2_client)
        self.ssm = Stubber(self.ssm_client)
        self.dynamodb = Stubber(self.dynamodb_client)
        self.clients = RegionClients(
            REGION, ec2=self.ec2_client, ssm=self.ssm_client, dynamodb=self.dynamodb_client
        )
        self.sleeps: list[float] = []
        self.lines: list[str] = []
        self.timing = baker.Timing(
            command_delay=2, command_timeout=30, image_delay=10, image_timeout=30, sleep=self.sleeps.append
        )

    def bake(self, **kwargs: Any) -> baker.BakeResult:
        options: dict[str, Any] = {"no_reboot": True, "progress": self.lines.append, "timing": self.timing}
        options.update(kwargs)
        return baker.bake(self.clients, family(), INSTANCE, NOW, **options)

    # ---- expected calls ----

    def send(self, purpose: str, command: str, command_id: str) -> None:
        self.ssm.add_response(
            "send_command",
            {"Command": {"CommandId": command_id}},
            {
                "InstanceIds": [INSTANCE],
                "DocumentName": "AWS-RunShellScript",
                "Comment": f"ami-janitor bake pettracker-ml: {purpose} command",
                "Parameters": {"commands": [command], "executionTimeout": ["30"]},
                "TimeoutSeconds": 60,
            },
        )

    def invocation(self, command_id: str, status: str | None, **extra: Any) -> None:
        expected = {"CommandId": command_id, "InstanceId": INSTANCE}
        if status is None:
            self.ssm.add_client_error(
                "get_command_invocation",
                service_error_code="InvocationDoesNotExist",
                expected_params=expected,
            )
        else:
            self.ssm.add_response("get_command_invocation", {"Status": status, **extra}, expected)

    def create(self, image_id: str = IMAGE) -> None:
        self.ec2.add_response("create_image", {"ImageId": image_id}, CREATE_IMAGE)
        self.ledger_record(image_id)

    def ledger_record(self, image_id: str) -> None:
        """The bake, recorded on the new AMI's ledger item once CreateImage answered."""
        self.dynamodb.add_response(
            "update_item",
            {},
            ledger_write(
                {
                    "TableName": "ami-janitor-ledger",
                    "Key": {"pk": {"S": f"image#{image_id}"}, "sk": {"S": "item"}},
                    "UpdateExpression": "SET image_id = :id, bakes = :bakes",
                    "ConditionExpression": "attribute_not_exists(bakes)",
                    "ExpressionAttributeValues": {
                        ":id": {"S": image_id},
                        ":bakes": {
                            "L": [
                                {"M": {"instance_id": {"S": INSTANCE}, "at": {"S": "2026-11-25T03:00:00Z"}}}
                            ]
                        },
                    },
                }
            ),
        )

    def create_fails(self, code: str, message: str) -> None:
        self.ec2.add_client_error(
            "create_image", service_error_code=code, service_message=message, expected_params=CREATE_IMAGE
        )

    def image(self, state: str | None, **extra: Any) -> None:
        expected = {"ImageIds": [IMAGE]}
        if state is None:
            self.ec2.add_client_error(
                "describe_images", service_error_code="InvalidAMIID.NotFound", expected_params=expected
            )
        else:
            self.ec2.add_response(
                "describe_images", {"Images": [{"ImageId": IMAGE, "State": state, **extra}]}, expected
            )


@pytest.fixture
def aws(fake_aws_env: None) -> Iterator[Stubbed]:
    stubbed = Stubbed()
    with stubbed.ec2, stubbed.ssm, stubbed.dynamodb:
        yield stubbed
        stubbed.ec2.assert_no_pending_responses()
        stubbed.ssm.assert_no_pending_responses()
        stubbed.dynamodb.assert_no_pending_responses()


@pytest.fixture
def fake_aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")


def test_create_image_is_sent_exactly_and_the_wait_reports_each_poll(aws: Stubbed) -> None:
    aws.create()
    aws.image(None)  # not visible yet right after CreateImage
    aws.image("pending")
    aws.image("available")

    result = aws.bake()

    assert result.image_id == IMAGE
    assert result.state == "available"
    assert result.warnings == [baking.NO_REBOOT_WARNING]
    assert aws.lines == [
        f"creating image pettracker-ml-20261125T030000Z from {INSTANCE}",
        f"{IMAGE}: not visible yet (0s)",
        f"{IMAGE}: pending (10s)",
        f"{IMAGE}: available (20s)",
    ]
    assert aws.sleeps == [10, 10]


def test_without_waiting_only_create_image_is_called(aws: Stubbed) -> None:
    aws.create()

    result = aws.bake(wait=False)

    assert (result.image_id, result.state) == (IMAGE, "pending")


def duplicate_name(aws: Stubbed, *images: dict[str, Any]) -> None:
    """CreateImage sent again after its answer was lost: the name is taken by the first attempt's image."""
    name = CREATE_IMAGE["Name"]
    aws.create_fails("InvalidAMIName.Duplicate", f"AMI name {name} is already in use by AMI {IMAGE}")
    aws.ec2.add_response(
        "describe_images",
        {"Images": list(images)},
        {"Owners": ["self"], "IncludeDisabled": True, "Filters": [{"Name": "name", "Values": [name]}]},
    )


def test_a_create_image_retried_after_its_answer_was_lost_is_the_image_it_made(aws: Stubbed) -> None:
    duplicate_name(aws, {"ImageId": IMAGE, "Name": CREATE_IMAGE["Name"], "SourceInstanceId": INSTANCE})
    aws.ledger_record(IMAGE)

    result = aws.bake(wait=False)

    assert (result.image_id, result.state) == (IMAGE, "pending")
    aws.ec2.assert_no_pending_responses()
    aws.dynamodb.assert_no_pending_responses()


def test_the_image_a_lost_create_image_made_is_looked_for_until_ec2_lists_it(aws: Stubbed) -> None:
    """EC2 refused the retry's name, and DescribeImages does not list the first attempt's image yet
    (eventual consistency): it is asked again after 2 and 4 seconds, and the bake is that image."""
    duplicate_name(aws)
    name_filter = {
        "Owners": ["self"],
        "IncludeDisabled": True,
        "Filters": [{"Name": "name", "Values": [CREATE_IMAGE["Name"]]}],
    }
    aws.ec2.add_response("describe_images", {"Images": []}, name_filter)
    aws.ec2.add_response(
        "describe_images",
        {"Images": [{"ImageId": IMAGE, "Name": CREATE_IMAGE["Name"], "SourceInstanceId": INSTANCE}]},
        name_filter,
    )
    aws.ledger_record(IMAGE)

    result = aws.bake(wait=False)

    assert result.image_id == IMAGE
    assert aws.sleeps == [2.0, 4.0]


def test_a_duplicate_name_nobody_lists_or_a_failed_lookup_is_a_bake_error(aws: Stubbed) -> None:
    duplicate_name(aws)
    name_filter = {
        "Owners": ["self"],
        "IncludeDisabled": True,
        "Filters": [{"Name": "name", "Values": [CREATE_IMAGE["Name"]]}],
    }
    for _ in range(3):
        aws.ec2.add_response("describe_images", {"Images": []}, name_filter)
    with pytest.raises(baking.BakeError, match=r"InvalidAMIName\.Duplicate") as refused:
        aws.bake(wait=False)
    assert refused.value.image_id is None and aws.sleeps == [2.0, 4.0, 8.0]
    aws.create_fails("InvalidAMIName.Duplicate", "AMI name is already in use")
    aws.ec2.add_client_error(
        "describe_images", "RequestLimitExceeded", "slow down", expected_params=name_filter
    )
    with pytest.raises(baking.BakeError, match="could not be looked up: RequestLimitExceeded: slow down"):
        aws.bake(wait=False)


def test_a_duplicate_name_made_from_another_instance_is_no_bake_of_this_one(aws: Stubbed) -> None:
    # EC2 says who made it: a baked-from tag naming this instance does not override that.
    tags = [{"Key": "ami-janitor:baked-from", "Value": INSTANCE}]
    duplicate_name(
        aws, {"ImageId": IMAGE, "Name": CREATE_IMAGE["Name"], "SourceInstanceId": "i-other", "Tags": tags}
    )

    with pytest.raises(baking.BakeError, match=r"InvalidAMIName\.Duplicate"):
        aws.bake(wait=False)


def test_a_duplicate_name_only_tagged_with_this_instance_is_no_bake_of_this_one(aws: Stubbed) -> None:
    # Anyone may tag an image of that name: without EC2's SourceInstanceId it is not ours.
    tags = [{"Key": "ami-janitor:baked-from", "Value": INSTANCE}]
    duplicate_name(aws, {"ImageId": IMAGE, "Name": CREATE_IMAGE["Name"], "Tags": tags})

    with pytest.raises(baking.BakeError, match=r"InvalidAMIName\.Duplicate"):
        aws.bake(wait=False)


def test_run_command_stops_the_application_before_and_starts_it_after_create_image(aws: Stubbed) -> None:
    aws.send("stop", STOP, STOP_ID)
    aws.invocation(STOP_ID, None)  # normal right after SendCommand
    aws.invocation(STOP_ID, "InProgress")
    aws.invocation(STOP_ID, "Success")
    aws.create()
    aws.send("start", START, START_ID)
    aws.invocation(START_ID, "Success")
    aws.image("available")

    result = aws.bake(stop_command=STOP, start_command=START)

    assert result.warnings == []
    assert result.state == "available"
    assert aws.lines == [
        f"running the stop command on {INSTANCE}",
        f"stop command on {INSTANCE}: not delivered yet",
        f"stop command on {INSTANCE}: InProgress",
        f"creating image pettracker-ml-20261125T030000Z from {INSTANCE}",
        f"running the start command on {INSTANCE}",
        f"{IMAGE}: available (0s)",
    ]
    assert aws.sleeps == [2, 2]


def test_the_start_command_runs_even_when_create_image_fails(aws: Stubbed) -> None:
    aws.send("stop", STOP, STOP_ID)
    aws.invocation(STOP_ID, "Success")
    aws.create_fails("InvalidInstanceID.NotFound", f"The instance ID '{INSTANCE}' does not exist")
    aws.send("start", START, START_ID)
    aws.invocation(START_ID, "Success")

    with pytest.raises(baking.BakeError) as failure:
        aws.bake(stop_command=STOP, start_command=START)

    assert str(failure.value) == (
        f"CreateImage from {INSTANCE} failed: InvalidInstanceID.NotFound: "
        f"The instance ID '{INSTANCE}' does not exist"
    )
    assert failure.value.image_id is None


def test_a_failed_stop_command_fails_the_bake_and_still_runs_the_start_command(aws: Stubbed) -> None:
    aws.send("stop", STOP, STOP_ID)
    aws.invocation(
        STOP_ID,
        "Failed",
        StatusDetails="Failed",
        ResponseCode=5,
        StandardErrorContent="Failed to stop pettracker-ml.service: Access denied\n",
    )
    aws.send("start", START, START_ID)
    aws.invocation(START_ID, "Success")

    with pytest.raises(baking.BakeError, match="the stop command failed") as failure:
        aws.bake(stop_command=STOP, start_command=START)  # no CreateImage: the Stubber would refuse it

    assert str(failure.value) == (
        f"the stop command failed on {INSTANCE}: Failed, exit code 5, "
        "stderr: Failed to stop pettracker-ml.service: Access denied"
    )


def test_a_stop_command_that_cannot_be_sent_runs_nothing_else(aws: Stubbed) -> None:
    aws.ssm.add_client_error(
        "send_command",
        service_error_code="InvalidInstanceId",
        service_message="Instances not in a valid state for account",
    )

    with pytest.raises(
        baking.BakeError, match=f"the stop command could not be sent to {INSTANCE}: InvalidInstanceId"
    ):
        aws.bake(stop_command=STOP, start_command=START)


def stop_answer_lost(aws: Stubbed) -> None:
    """SendCommand of the stop command answers a 5xx: it may have been delivered all the same."""
    aws.ssm.add_client_error(
        "send_command",
        service_error_code="InternalServerError",
        service_message="Internal error",
        http_status_code=500,
    )


def test_a_stop_command_whose_answer_was_lost_is_followed_by_the_start_command(aws: Stubbed) -> None:
    """A 5xx, a throttle or a timeout may come after the command was delivered: the application may be
    stopped, so the start command runs (on a running one it is harmless). Nothing is imaged."""
    stop_answer_lost(aws)
    aws.send("start", START, START_ID)
    aws.invocation(START_ID, "Success")

    with pytest.raises(baking.BakeError) as failure:
        aws.bake(stop_command=STOP, start_command=START)

    assert str(failure.value) == (
        f"the stop command could not be sent to {INSTANCE}: InternalServerError: Internal error; "
        "the start command was run after it"
    )


def test_a_stop_command_whose_answer_was_lost_without_a_start_command_says_no_more(aws: Stubbed) -> None:
    stop_answer_lost(aws)
    with pytest.raises(baking.BakeError) as failure:
        aws.bake(stop_command=STOP)
    assert (
        str(failure.value)
        == f"the stop command could not be sent to {INSTANCE}: InternalServerError: Internal error"
    )


def test_a_failed_start_command_is_an_error_that_still_names_the_image(aws: Stubbed) -> None:
    aws.send("stop", STOP, STOP_ID)
    aws.invocation(STOP_ID, "Success")
    aws.create()
    aws.send("start", START, START_ID)
    aws.invocation(START_ID, "TimedOut", StatusDetails="DeliveryTimedOut", ResponseCode=-1)

    with pytest.raises(baking.BakeError) as failure:
        aws.bake(stop_command=STOP, start_command=START)

    assert str(failure.value) == (
        f"image {IMAGE} was created, but the start command failed on {INSTANCE}: DeliveryTimedOut"
    )
    assert failure.value.image_id == IMAGE


def test_both_failures_are_reported_when_create_image_and_the_start_command_fail(aws: Stubbed) -> None:
    aws.send("stop", STOP, STOP_ID)
    aws.invocation(STOP_ID, "Success")
    aws.create_fails("InvalidParameterValue", "bad name")
    aws.send("start", START, START_ID)
    aws.invocation(START_ID, "Failed", StatusDetails="Failed", ResponseCode=1)

    with pytest.raises(baking.BakeError) as failure:
        aws.bake(stop_command=STOP, start_command=START)

    assert str(failure.value) == (
        f"CreateImage from {INSTANCE} failed: InvalidParameterValue: bad name; "
        f"then the start command failed on {INSTANCE}: Failed, exit code 1"
    )


def test_a_command_that_never_finishes_is_bounded(aws: Stubbed) -> None:
    # 30 s execution + 60 s delivery + 30 s slack, polled every 2 s: 60 polls.
    aws.send("stop", STOP, STOP_ID)
    for _ in range(60):
        aws.invocation(STOP_ID, "InProgress")
    aws.send("start", START, START_ID)
    aws.invocation(START_ID, "Success")

    with pytest.raises(baking.BakeError, match=r"the stop command on i-\w+ did not finish within 120 s"):
        aws.bake(stop_command=STOP, start_command=START)
    assert len(aws.sleeps) == 59


def test_a_failed_image_is_an_error_with_its_state_reason(aws: Stubbed) -> None:
    aws.create()
    aws.image("pending")
    aws.image(
        "failed",
        StateReason={"Code": "Server.InternalError", "Message": "Server.InternalError: Internal error"},
    )

    with pytest.raises(baking.BakeError) as failure:
        aws.bake()

    assert str(failure.value) == f"image {IMAGE} is failed: Server.InternalError: Internal error"
    assert failure.value.image_id == IMAGE


def test_waiting_for_the_image_is_bounded(aws: Stubbed) -> None:
    aws.create()
    for _ in range(3):  # 30 s every 10 s
        aws.image("pending")

    with pytest.raises(baking.BakeError, match=f"image {IMAGE} is not available after 30s") as failure:
        aws.bake()
    assert failure.value.image_id == IMAGE


TAGGED = {
    "Filters": [
        {"Name": "tag:Role", "Values": ["pettracker-ml"]},
        {"Name": "instance-state-name", "Values": ["pending", "running", "stopped", "stopping"]},
    ]
}


ROLE_TAGS = [{"Key": "Role", "Value": "pettracker-ml"}]


def raw_instance(
    instance_id: str, state: str = "running", launched: datetime = NOW, tags: list[Any] | None = None
) -> dict[str, Any]:
    return {
        "InstanceId": instance_id,
        "State": {"Name": state},
        "LaunchTime": launched,
        "Tags": ROLE_TAGS if tags is None else tags,
    }


def pinned(**bake: Any) -> Family:
    return family().model_copy(update={"bake": Bake(instance_id=INSTANCE, **bake)})


def test_find_bake_instance_filters_on_the_tags_and_states_and_takes_the_only_one(aws: Stubbed) -> None:
    aws.ec2.add_response("describe_instances", {"Reservations": [], "NextToken": "page-2"}, TAGGED)
    aws.ec2.add_response(
        "describe_instances",
        {"Reservations": [{"Instances": [raw_instance(INSTANCE, "stopped")]}]},
        {**TAGGED, "NextToken": "page-2"},
    )

    assert baker.find_bake_instance(aws.clients, family()) == INSTANCE


def test_find_bake_instance_refuses_several_tagged_instances_across_pages(aws: Stubbed) -> None:
    # The newest is not chosen: anyone who can launch or tag an instance could make it the newest.
    aws.ec2.add_response(
        "describe_instances",
        {
            "Reservations": [{"Instances": [raw_instance("i-0aaa", launched=NOW - timedelta(days=9))]}],
            "NextToken": "page-2",
        },
        TAGGED,
    )
    aws.ec2.add_response(
        "describe_instances",
        {"Reservations": [{"Instances": [raw_instance("i-0bbb", "stopped")]}]},
        {**TAGGED, "NextToken": "page-2"},
    )

    with pytest.raises(baking.BakeError) as refused:
        baker.find_bake_instance(aws.clients, family())

    assert not isinstance(refused.value, baking.BakeUsageError)
    assert "2 instances in us-east-1 carry the tags Role=pettracker-ml" in str(refused.value)
    assert "i-0aaa (running), i-0bbb (stopped)" in str(refused.value)
    assert "bake.instance_id or pass --instance-id" in str(refused.value)


def test_find_bake_instance_asks_for_the_pinned_instance_by_id(aws: Stubbed) -> None:
    by_id = {"InstanceIds": [INSTANCE]}
    aws.ec2.add_response(
        "describe_instances", {"Reservations": [{"Instances": [raw_instance(INSTANCE)]}]}, by_id
    )
    aws.ec2.add_response(
        "describe_instances", {"Reservations": [{"Instances": [raw_instance(INSTANCE, tags=[])]}]}, by_id
    )
    aws.ec2.add_client_error(
        "describe_instances", service_error_code="InvalidInstanceID.NotFound", expected_params=by_id
    )

    assert baker.find_bake_instance(aws.clients, pinned(instance_tag={"Role": "pettracker-ml"})) == INSTANCE
    with pytest.raises(baking.BakeError, match=f"{INSTANCE} does not carry the tags Role=pettracker-ml"):
        baker.find_bake_instance(aws.clients, pinned(instance_tag={"Role": "pettracker-ml"}))
    with pytest.raises(baking.BakeError, match=f"bake.instance_id {INSTANCE} does not exist in us-east-1"):
        baker.find_bake_instance(aws.clients, pinned())


def test_find_bake_instance_reports_a_failing_describe(aws: Stubbed) -> None:
    aws.ec2.add_client_error(
        "describe_instances", service_error_code="UnauthorizedOperation", expected_params=TAGGED
    )

    with pytest.raises(
        baking.BakeError, match="cannot list the build instances of pettracker-ml: UnauthorizedOperation"
    ):
        baker.find_bake_instance(aws.clients, family())


# ---- malformed and lost answers around CreateImage and the commands ----


def test_a_create_image_answer_without_an_image_id_is_the_image_made_from_the_instance(aws: Stubbed) -> None:
    """The image may have been made all the same: looked up by its name and its instance, as after a
    lost answer (a bare KeyError left it unrecorded and named no failure)."""
    name_filter = {
        "Owners": ["self"],
        "IncludeDisabled": True,
        "Filters": [{"Name": "name", "Values": [CREATE_IMAGE["Name"]]}],
    }
    aws.ec2.add_response("create_image", {}, CREATE_IMAGE)
    made = {"ImageId": IMAGE, "Name": CREATE_IMAGE["Name"], "SourceInstanceId": INSTANCE}
    aws.ec2.add_response("describe_images", {"Images": [made]}, name_filter)
    aws.ledger_record(IMAGE)

    assert aws.bake(wait=False).image_id == IMAGE

    aws.ec2.add_response("create_image", {}, CREATE_IMAGE)
    for _ in baker.Timing().lookup_delays:
        aws.ec2.add_response("describe_images", {"Images": []}, name_filter)
    with pytest.raises(baking.BakeError) as refused:
        aws.bake(wait=False)
    assert str(refused.value) == (
        f"CreateImage from {INSTANCE} answered no image id, and no image {CREATE_IMAGE['Name']} made from it "
        "is listed"
    )


def test_a_malformed_describe_instances_answer_is_a_bake_error(aws: Stubbed) -> None:
    no_id = {"State": {"Name": "running"}, "Tags": [{"Key": "Role", "Value": "pettracker-ml"}]}
    aws.ec2.add_response("describe_instances", {"Reservations": [{"Instances": [no_id]}]}, TAGGED)

    with pytest.raises(baking.BakeError) as refused:
        baker.find_bake_instance(aws.clients, family())

    assert str(refused.value) == (
        "cannot list the build instances of pettracker-ml: DescribeInstances answered a malformed instance "
        "(KeyError: 'InstanceId')"
    )


def test_a_stop_command_sent_without_a_command_id_is_followed_by_the_start_command(aws: Stubbed) -> None:
    """SendCommand took the stop command but named no command: the application may be stopping, so the
    start command runs (a KeyError left it stopped)."""
    aws.ssm.add_response(
        "send_command",
        {},
        {
            "InstanceIds": [INSTANCE],
            "DocumentName": "AWS-RunShellScript",
            "Comment": "ami-janitor bake pettracker-ml: stop command",
            "Parameters": {"commands": [STOP], "executionTimeout": ["30"]},
            "TimeoutSeconds": 60,
        },
    )
    aws.send("start", START, START_ID)
    aws.invocation(START_ID, "Success")

    with pytest.raises(baking.BakeError) as refused:
        aws.bake(stop_command=STOP, start_command=START)

    assert str(refused.value) == (
        f"the stop command was sent to {INSTANCE}, but SendCommand answered no command id; the start "
        "command was run after it"
    )


@pytest.mark.parametrize("code", ["ThrottlingException", "InternalServerError"])
def test_the_stop_command_is_followed_to_its_end_through_an_answer_that_may_pass(
    aws: Stubbed, code: str
) -> None:
    """GetCommandInvocation throttled (past the SDK's retries) while the stop command drains: the stop is
    asked about again, not taken as ended. (The start command was sent at once, ran beside the stop,
    ended first, and the stop left the application stopped.)"""
    aws.send("stop", STOP, STOP_ID)
    aws.invocation(STOP_ID, "InProgress")
    aws.ssm.add_client_error(
        "get_command_invocation",
        service_error_code=code,
        http_status_code=500 if code == "InternalServerError" else 400,
        expected_params={"CommandId": STOP_ID, "InstanceId": INSTANCE},
    )
    aws.invocation(STOP_ID, "Success")
    aws.create()
    aws.send("start", START, START_ID)
    aws.invocation(START_ID, "Success")

    assert aws.bake(stop_command=STOP, start_command=START, wait=False).image_id == IMAGE


def test_a_command_that_cannot_be_followed_at_all_is_a_bake_error(aws: Stubbed) -> None:
    aws.send("stop", STOP, STOP_ID)
    aws.ssm.add_client_error(
        "get_command_invocation",
        service_error_code="AccessDeniedException",
        expected_params={"CommandId": STOP_ID, "InstanceId": INSTANCE},
    )
    aws.send("start", START, START_ID)
    aws.invocation(START_ID, "Success")

    with pytest.raises(
        baking.BakeError, match=f"the stop command on {INSTANCE} cannot be followed: AccessDenied"
    ):
        aws.bake(stop_command=STOP, start_command=START, wait=False)
