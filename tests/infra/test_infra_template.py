"""The synthesized templates: schedules, events, failure handling, encryption, alarms, environment.

Also what the emulator's CloudFormation skips (alarms, policies, subscriptions, event invoke configs,
architecture) is asserted here.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aws_cdk.assertions import Capture, Match, Template
from botocore.retries.standard import ExponentialBackoff
from infra.environment import (
    AMI_EVENTS_QUEUE_URL,
    AMI_JANITOR_CONFIG,
    LOG_LEVEL,
    POLICY_PATH_IN_LAMBDA,
    POWERTOOLS_METRICS_NAMESPACE,
    POWERTOOLS_SERVICE_NAME,
    PYDANTIC_DISABLE_PLUGINS,
    REPLICATION_QUEUE_URL,
    REPORT_BUCKET,
    TOPIC_ARN,
    WORK_QUEUE_URL,
)
from synth_support import Synth, as_list, functions_by_handler, ref_id, resources

from ami_janitor.aws import baker, runs
from ami_janitor.aws.clients import client_config
from ami_janitor.handlers import replicate, slices
from ami_janitor.handlers.events import BakeEvent, parse_bake_event

SOURCE = "AmiJanitor-us-east-1"  # in policy.regions: has the bake schedule
TARGET = "AmiJanitor-eu-west-1"  # a replication target only
EVENTS = Path(__file__).resolve().parents[1] / "events"

HANDLERS = {
    "scheduled": "ami_janitor.handlers.scheduled.handler",
    "ami_event": "ami_janitor.handlers.ami_event.handler",
    "replicate": "ami_janitor.handlers.replicate.handler",
    "bake": "ami_janitor.handlers.bake.handler",
    "slices": "ami_janitor.handlers.slices.handler",
}
# Asynchronously invoked functions: Lambda's retries, then the on-failure destination.
ASYNC_RETRY_ATTEMPTS = {"scheduled": 1, "bake": 0}


pytestmark = pytest.mark.slow  # synthesizes the stacks (or reads their synthesized templates)


@pytest.fixture(scope="module")
def source(synth: Synth) -> dict[str, Any]:
    return synth.template(SOURCE)


@pytest.fixture(scope="module")
def all_templates(synth: Synth) -> dict[str, dict[str, Any]]:
    return {name: synth.template(name) for name in synth.stack_names()}


def _queue(template: dict[str, Any], path_part: str) -> str:
    """Logical id of the queue whose id contains `path_part` (e.g. DeadLettersFailedInvocations)."""
    found = [k for k in resources(template, "AWS::SQS::Queue") if k.startswith(path_part)]
    assert len(found) == 1, (path_part, found)
    return found[0]


def test_functions_runtime_architecture_and_handlers(all_templates: dict[str, dict[str, Any]]) -> None:
    for name, template in all_templates.items():
        functions = functions_by_handler(template)
        expected = set(HANDLERS) if name == SOURCE else set(HANDLERS) - {"bake"}
        assert set(functions) == expected, name
        for module, (_, props) in functions.items():
            assert props["Handler"] == HANDLERS[module]
            assert props["Runtime"] == "python3.13"
            assert props["Architectures"] == ["arm64"]
            assert "Layers" not in props  # dependencies are in the code asset
            assert ref_id(props["LoggingConfig"]["LogGroup"]) in resources(template, "AWS::Logs::LogGroup")


def test_environment_contract(source: dict[str, Any]) -> None:
    functions = functions_by_handler(source)
    common = {
        AMI_JANITOR_CONFIG: POLICY_PATH_IN_LAMBDA,
        POWERTOOLS_SERVICE_NAME: "ami-janitor",
        POWERTOOLS_METRICS_NAMESPACE: "AmiJanitor",
        LOG_LEVEL: "INFO",
        PYDANTIC_DISABLE_PLUGINS: "__all__",
    }
    assert POLICY_PATH_IN_LAMBDA == "/var/task/policy.json"
    queue = _queue(source, "ReplicationQueue")
    bucket = next(k for k in resources(source, "AWS::S3::Bucket") if k.startswith("ReportsBucket"))
    topic = next(iter(resources(source, "AWS::SNS::Topic")))
    env = {m: props["Environment"]["Variables"] for m, (_, props) in functions.items()}
    assert env["scheduled"] == {
        **common,
        REPORT_BUCKET: {"Ref": bucket},
        TOPIC_ARN: {"Ref": topic},
        REPLICATION_QUEUE_URL: {"Ref": queue},
        WORK_QUEUE_URL: {"Ref": _queue(source, "WorkSlicesQueue")},
    }
    assert env["slices"] == {**common, REPORT_BUCKET: {"Ref": bucket}, TOPIC_ARN: {"Ref": topic}}
    assert env["ami_event"] == {
        **common,
        REPLICATION_QUEUE_URL: {"Ref": queue},
        AMI_EVENTS_QUEUE_URL: {"Ref": _queue(source, "AmiEventsQueue")},
    }
    assert env["replicate"] == {**common, REPLICATION_QUEUE_URL: {"Ref": queue}}
    assert env["bake"] == common


def test_a_scheduled_events_claim_is_held_as_long_as_its_run_may_last(source: dict[str, Any]) -> None:
    """A claim younger than the function's timeout may be a live run's, between its claim and its
    record: a second delivery of the event within it queues nothing (aws/runs.py)."""
    _, scheduled = functions_by_handler(source)["scheduled"]
    assert scheduled["Timeout"] == runs.SCHEDULED_RUN_TIMEOUT.total_seconds()


def test_scheduled_run_rule(source: dict[str, Any], infra_policy: Any) -> None:
    scheduled_id, _ = functions_by_handler(source)["scheduled"]
    Template.from_json(source).has_resource_properties(
        "AWS::Events::Rule",
        {
            "ScheduleExpression": infra_policy.schedule,
            "State": "ENABLED",
            "Targets": [Match.object_like({"Arn": {"Fn::GetAtt": [scheduled_id, "Arn"]}})],
        },
    )


def test_ami_state_change_rule(all_templates: dict[str, dict[str, Any]]) -> None:
    for name, template in all_templates.items():
        queue = _queue(template, "AmiEventsQueue")
        Template.from_json(template).has_resource_properties(
            "AWS::Events::Rule",
            {
                # Exact: EventBridge matches keys case-sensitively, and the key is detail.State.
                "EventPattern": Match.exact(
                    {
                        "source": ["aws.ec2"],
                        "detail-type": ["EC2 AMI State Change"],
                        # This account's events only (a bus may receive others', forwarded).
                        "account": [{"Ref": "AWS::AccountId"}],
                        # This region's only (one forwarded from another would fail in the queue).
                        "region": [name.removeprefix("AmiJanitor-")],
                        "detail": {"State": ["available", "failed", "deregistered", "disabled"]},
                    }
                ),
                # The region's events are one message group of the FIFO queue: one batch at a time.
                "Targets": [
                    Match.object_like(
                        {
                            "Arn": {"Fn::GetAtt": [queue, "Arn"]},
                            "SqsParameters": {"MessageGroupId": "ami-state-changes"},
                        }
                    )
                ],
            },
        )


def test_the_bake_outlasts_a_throttled_create_image_and_its_duplicate_lookup(source: dict[str, Any]) -> None:
    """The bake records its AMI in the ledger only after CreateImage answers, and is not invoked again:
    a timeout between leaves an image made and never recorded. One CreateImage throttled on every
    attempt backs off for up to the SDK's truncated exponential backoff over the clients' attempts,
    then a retried attempt refused as a duplicate name is looked up for Timing.lookup_delays."""
    _, bake = functions_by_handler(source)["bake"]
    attempts = int(client_config().retries["total_max_attempts"])
    backoff = sum(min(2**i, ExponentialBackoff._MAX_BACKOFF) for i in range(attempts - 1))
    assert bake["Timeout"] >= 2 * (backoff + sum(baker.Timing().lookup_delays))


def test_bake_rules_one_per_scheduled_family(
    all_templates: dict[str, dict[str, Any]], infra_policy: Any
) -> None:
    source = all_templates[SOURCE]
    bake_id, _ = functions_by_handler(source)["bake"]
    transformer = Capture()
    template = Template.from_json(source)
    template.has_resource_properties(
        "AWS::Events::Rule",
        {
            "ScheduleExpression": "cron(0 2 * * ? *)",
            "Targets": [
                Match.object_like({"Arn": {"Fn::GetAtt": [bake_id, "Arn"]}, "InputTransformer": transformer})
            ],
        },
    )
    # The scheduled event's time, the same in every delivery of it, names the bake.
    assert transformer.as_object() == {
        "InputPathsMap": {"time": "$.time"},
        "InputTemplate": '{"family":"pettracker-ml","time":<time>}',
    }
    # EventBridge writes a string at an unquoted placeholder as a JSON string: the bake function reads it.
    scheduled_event = json.loads((EVENTS / "scheduled.json").read_text())
    delivered = transformer.as_object()["InputTemplate"].replace(
        "<time>", json.dumps(scheduled_event["time"])
    )
    assert parse_bake_event(json.loads(delivered)) == BakeEvent(
        family="pettracker-ml", time=datetime(2026, 11, 25, 3, 0, tzinfo=UTC)
    )
    scheduled = [f for f in infra_policy.families if f.bake and f.bake.schedule]
    assert [f.name for f in scheduled] == ["pettracker-ml"]  # base-linux bakes only by hand
    bake_rules = [
        r
        for r in resources(source, "AWS::Events::Rule").values()
        if any(ref_id(t["Arn"]) == bake_id for t in r["Properties"]["Targets"])
    ]
    assert len(bake_rules) == len(scheduled)
    # 1 scheduled run + 1 AMI events + 1 bake; replication-only regions have no bakes.
    assert len(resources(source, "AWS::Events::Rule")) == 3
    for name, other in all_templates.items():
        if name != SOURCE:
            assert len(resources(other, "AWS::Events::Rule")) == 2


def test_every_rule_target_has_dead_letter_queue_and_retry_policy(
    all_templates: dict[str, dict[str, Any]],
) -> None:
    for template in all_templates.values():
        dlq = _queue(template, "DeadLettersEventTargets")
        rules = resources(template, "AWS::Events::Rule")
        assert rules
        for rule in rules.values():
            for target in rule["Properties"]["Targets"]:
                assert ref_id(target["DeadLetterConfig"]["Arn"]) == dlq
                retry = target["RetryPolicy"]
                assert 1 <= retry["MaximumRetryAttempts"] <= 10
                assert 60 <= retry["MaximumEventAgeInSeconds"] <= 2 * 3600
        # EventBridge may write to the DLQ only for these rules.
        policies = [
            p
            for p in resources(template, "AWS::SQS::QueuePolicy").values()
            if [ref_id(q) for q in p["Properties"]["Queues"]] == [dlq]
        ]
        sources = {
            ref_id(arn)
            for p in policies
            for s in p["Properties"]["PolicyDocument"]["Statement"]
            if s["Effect"] == "Allow"
            for arn in as_list(s["Condition"]["ArnEquals"]["aws:SourceArn"])
        }
        assert sources == set(rules)


def test_async_functions_have_bounded_retries_and_failure_destination(
    all_templates: dict[str, dict[str, Any]],
) -> None:
    for template in all_templates.values():
        failed = _queue(template, "DeadLettersFailedInvocations")
        configs = {
            ref_id(c["Properties"]["FunctionName"]): c["Properties"]
            for c in resources(template, "AWS::Lambda::EventInvokeConfig").values()
        }
        functions = functions_by_handler(template)
        for module, retries in ASYNC_RETRY_ATTEMPTS.items():
            if module not in functions:
                continue
            config = configs.pop(functions[module][0])
            assert config["MaximumRetryAttempts"] == retries
            assert config["MaximumEventAgeInSeconds"] <= 2 * 3600
            assert config["Qualifier"] == "$LATEST"
            assert ref_id(config["DestinationConfig"]["OnFailure"]["Destination"]) == failed
        assert configs == {}  # the AMI event, slice and replication functions are invoked by SQS


def test_ami_events_one_batch_at_a_time_per_region_from_a_fifo_queue_with_redrive(
    all_templates: dict[str, dict[str, Any]],
) -> None:
    for name, template in all_templates.items():
        queue = _queue(template, "AmiEventsQueue")
        dlq = _queue(template, "AmiEventsDeadLetters")
        function_id, function = functions_by_handler(template)["ami_event"]
        Template.from_json(template).has_resource_properties(
            "AWS::Lambda::EventSourceMapping",
            {
                "EventSourceArn": {"Fn::GetAtt": [queue, "Arn"]},
                "FunctionName": {"Ref": function_id},
                "FunctionResponseTypes": ["ReportBatchItemFailures"],
                "ScalingConfig": {"MaximumConcurrency": 2},
            },
        )
        props = template["Resources"][queue]["Properties"]
        # FIFO, as EventBridge's FIFO targets ask: content-based deduplication (a repeated delivery of
        # an event is dropped).
        assert props["FifoQueue"] is True and props["ContentBasedDeduplication"] is True, name
        assert template["Resources"][dlq]["Properties"]["FifoQueue"] is True
        assert ref_id(props["RedrivePolicy"]["deadLetterTargetArn"]) == dlq
        assert 1 < props["RedrivePolicy"]["maxReceiveCount"] <= 10
        assert props["VisibilityTimeout"] >= 6 * function["Timeout"]
        alarmed = Capture()
        Template.from_json(template).has_resource_properties(
            "AWS::CloudWatch::Alarm",
            {
                "MetricName": "ApproximateNumberOfMessagesVisible",
                "Dimensions": [{"Name": "QueueName", "Value": {"Fn::GetAtt": [alarmed, "QueueName"]}}],
                "AlarmDescription": Match.string_like_regexp("AMI state-change event failed"),
            },
        )
        assert alarmed.as_string() == dlq
        # Only EventBridge, for this rule, may send to it.
        [rule_id] = [
            k
            for k, r in resources(template, "AWS::Events::Rule").items()
            if any(ref_id(t["Arn"]) == queue for t in r["Properties"]["Targets"])
        ]
        allowed = [
            s
            for p in resources(template, "AWS::SQS::QueuePolicy").values()
            if [ref_id(q) for q in p["Properties"]["Queues"]] == [queue]
            for s in p["Properties"]["PolicyDocument"]["Statement"]
            if s["Effect"] == "Allow"
        ]
        assert [s["Principal"] for s in allowed] == [{"Service": "events.amazonaws.com"}]
        assert ref_id(allowed[0]["Condition"]["ArnEquals"]["aws:SourceArn"]) == rule_id
        # And every other sender is denied (an absent aws:SourceArn is not the rule's).
        [deny] = [
            s
            for p in resources(template, "AWS::SQS::QueuePolicy").values()
            if [ref_id(q) for q in p["Properties"]["Queues"]] == [queue]
            for s in p["Properties"]["PolicyDocument"]["Statement"]
            if s["Effect"] == "Deny" and s["Action"] == "sqs:SendMessage"
        ]
        assert deny["Principal"] == {"AWS": "*"}
        assert ref_id(deny["Condition"]["ArnNotEquals"]["aws:SourceArn"]) == rule_id


def test_no_function_has_reserved_concurrency(all_templates: dict[str, dict[str, Any]]) -> None:
    # A new account's Lambda quota of 10 refuses any reservation; one would also throttle SQS pollers.
    for template in all_templates.values():
        for _, function in functions_by_handler(template).values():
            assert "ReservedConcurrentExecutions" not in function


def test_replication_queue_worker_and_redrive(source: dict[str, Any]) -> None:
    queue = _queue(source, "ReplicationQueue")
    dlq = _queue(source, "ReplicationDeadLetters")
    worker_id, worker = functions_by_handler(source)["replicate"]
    template = Template.from_json(source)
    template.has_resource_properties(
        "AWS::Lambda::EventSourceMapping",
        {
            "EventSourceArn": {"Fn::GetAtt": [queue, "Arn"]},
            "FunctionName": {"Ref": worker_id},
            "FunctionResponseTypes": ["ReportBatchItemFailures"],
            "ScalingConfig": {"MaximumConcurrency": 2},
        },
    )
    props = source["Resources"][queue]["Properties"]
    assert ref_id(props["RedrivePolicy"]["deadLetterTargetArn"]) == dlq
    assert 1 < props["RedrivePolicy"]["maxReceiveCount"] <= 10
    assert props["VisibilityTimeout"] >= 6 * worker["Timeout"]
    # It has time for more than the one record the reserve keeps room for (the records it has no time
    # left for are made visible again in its own queue: test_environment_contract).
    assert worker["Timeout"] * 1000 >= 2 * replicate.RESERVE_MILLIS


def test_work_slices_one_at_a_time_per_region_from_a_fifo_queue_with_redrive(
    all_templates: dict[str, dict[str, Any]],
) -> None:
    for name, template in all_templates.items():
        queue = _queue(template, "WorkSlicesQueue")
        dlq = _queue(template, "WorkSlicesDeadLetters")
        worker_id, worker = functions_by_handler(template)["slices"]
        Template.from_json(template).has_resource_properties(
            "AWS::Lambda::EventSourceMapping",
            {
                "EventSourceArn": {"Fn::GetAtt": [queue, "Arn"]},
                "FunctionName": {"Ref": worker_id},
                "BatchSize": 1,
                "FunctionResponseTypes": ["ReportBatchItemFailures"],
                "ScalingConfig": {"MaximumConcurrency": 2},
            },
        )
        props = template["Resources"][queue]["Properties"]
        # FIFO: the scheduled run sends one message group per region, deduplicated by slice.
        assert props["FifoQueue"] is True and "ContentBasedDeduplication" not in props, name
        assert template["Resources"][dlq]["Properties"]["FifoQueue"] is True
        assert ref_id(props["RedrivePolicy"]["deadLetterTargetArn"]) == dlq
        assert 1 < props["RedrivePolicy"]["maxReceiveCount"] <= 10
        assert props["VisibilityTimeout"] >= 6 * worker["Timeout"]
        # No reserved concurrency: it would throttle the poller into the dead-letter queue.
        assert "ReservedConcurrentExecutions" not in worker
        assert worker["Timeout"] == slices.WORKER_TIMEOUT_SECONDS  # the fleet simulator's too
        alarmed = Capture()
        Template.from_json(template).has_resource_properties(
            "AWS::CloudWatch::Alarm",
            {
                "MetricName": "ApproximateNumberOfMessagesVisible",
                "Dimensions": [{"Name": "QueueName", "Value": {"Fn::GetAtt": [alarmed, "QueueName"]}}],
                "AlarmDescription": Match.string_like_regexp("work slice failed"),
            },
        )
        assert alarmed.as_string() == dlq
        roles = {m: ref_id(p["Role"]) for m, (_, p) in functions_by_handler(template).items()}
        senders = [r for r in roles.values() if _may_send(template, r, queue)]
        assert senders == [roles["scheduled"]], name


def _may_send(template: dict[str, Any], role_id: str, queue: str) -> bool:
    """The role's own policy allows sqs:SendMessage on the queue."""
    policies = template["Resources"][role_id]["Properties"].get("Policies", [])
    return any(
        statement["Effect"] == "Allow"
        and "sqs:SendMessage" in as_list(statement["Action"])
        and queue in {ref_id(r) for r in as_list(statement["Resource"])}
        for policy in policies
        for statement in policy["PolicyDocument"]["Statement"]
    )


def test_only_the_roles_that_enqueue_may_send_copy_requests(all_templates: dict[str, dict[str, Any]]) -> None:
    for name, template in all_templates.items():
        queue = _queue(template, "ReplicationQueue")
        senders = Capture()
        Template.from_json(template).has_resource_properties(
            "AWS::SQS::QueuePolicy",
            {
                "Queues": [{"Ref": queue}],
                "PolicyDocument": {
                    "Statement": Match.array_with(
                        [
                            {
                                "Sid": "OnlyJanitorSendsCopyRequests",
                                "Effect": "Deny",
                                "Principal": {"AWS": "*"},
                                "Action": "sqs:SendMessage",
                                "Resource": {"Fn::GetAtt": [queue, "Arn"]},
                                "Condition": {"ArnNotEquals": {"aws:PrincipalArn": senders}},
                            }
                        ]
                    )
                },
            },
        )
        excepted = {ref_id(arn) for arn in senders.as_array()}
        roles = {
            module: ref_id(props["Role"]) for module, (_, props) in functions_by_handler(template).items()
        }
        # The functions that plan copies, and the worker, which sends again the requests it has no time
        # left for.
        assert excepted == {roles["scheduled"], roles["ami_event"], roles["replicate"]}, name
        # Every role granted sending is excepted, and no other.
        assert excepted == {r for r in roles.values() if r and _may_send(template, r, queue)}, name


def test_queues_encrypted_and_tls_only(all_templates: dict[str, dict[str, Any]]) -> None:
    for template in all_templates.values():
        queues = resources(template, "AWS::SQS::Queue")
        # event-target DLQ, failed invocations, the AMI event, replication and work queues and their DLQs
        assert len(queues) == 8
        tls_only: set[str | None] = set()
        for policy in resources(template, "AWS::SQS::QueuePolicy").values():
            for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
                if statement["Effect"] == "Deny" and statement.get("Condition") == {
                    "Bool": {"aws:SecureTransport": "false"}
                }:
                    tls_only.update(ref_id(q) for q in policy["Properties"]["Queues"])
        for logical_id, queue in queues.items():
            assert queue["Properties"]["SqsManagedSseEnabled"] is True
            assert logical_id in tls_only


def test_alarms_publish_to_the_topic(all_templates: dict[str, dict[str, Any]]) -> None:
    for template in all_templates.values():
        topic = next(iter(resources(template, "AWS::SNS::Topic")))
        alarms = list(resources(template, "AWS::CloudWatch::Alarm").values())
        for alarm in alarms:
            assert alarm["Properties"]["AlarmActions"] == [{"Ref": topic}]
            assert alarm["Properties"]["TreatMissingData"] == "notBreaching"
        errors = {
            ref_id(d["Value"])
            for a in alarms
            if a["Properties"].get("MetricName") == "Errors"
            for d in a["Properties"]["Dimensions"]
        }
        assert errors == {fid for fid, _ in functions_by_handler(template).values()}
        visible = {
            ref_id(d["Value"])
            for a in alarms
            if a["Properties"].get("MetricName") == "ApproximateNumberOfMessagesVisible"
            for d in a["Properties"]["Dimensions"]
        }
        dead_letter_queues = {
            _queue(template, "DeadLettersEventTargets"),
            _queue(template, "DeadLettersFailedInvocations"),
            _queue(template, "ReplicationDeadLetters"),
            _queue(template, "WorkSlicesDeadLetters"),
            _queue(template, "AmiEventsDeadLetters"),
        }
        assert visible == dead_letter_queues
        for metric in ("ActionsFailed", "RegionSkipped"):
            Template.from_json(template).has_resource_properties(
                "AWS::CloudWatch::Alarm",
                {
                    "Namespace": "AmiJanitor",
                    "MetricName": metric,
                    "Dimensions": [{"Name": "service", "Value": "ami-janitor"}],
                    "Statistic": "Sum",
                    "Threshold": 1,
                    "ComparisonOperator": "GreaterThanOrEqualToThreshold",
                },
            )
        assert len(alarms) == len(errors) + len(dead_letter_queues) + 2


def test_topic_encrypted_tls_only_with_email(source: dict[str, Any], infra_policy: Any) -> None:
    template = Template.from_json(source)
    ((topic_id, topic),) = resources(source, "AWS::SNS::Topic").items()
    key_id = ref_id(topic["Properties"]["KmsMasterKeyId"])
    key = source["Resources"][key_id]["Properties"]
    assert key["EnableKeyRotation"] is True
    principals = [s["Principal"] for s in key["KeyPolicy"]["Statement"]]
    assert {"Service": "cloudwatch.amazonaws.com"} in principals  # alarms can publish
    template.has_resource_properties(
        "AWS::SNS::TopicPolicy",
        {
            "Topics": [{"Ref": topic_id}],
            "PolicyDocument": {
                "Statement": Match.array_with(
                    [
                        Match.object_like(
                            {"Effect": "Deny", "Condition": {"Bool": {"aws:SecureTransport": "false"}}}
                        )
                    ]
                )
            },
        },
    )
    template.has_resource_properties(
        "AWS::SNS::Subscription",
        {"Protocol": "email", "Endpoint": infra_policy.notify.email, "TopicArn": {"Ref": topic_id}},
    )


def test_report_bucket(source: dict[str, Any]) -> None:
    buckets = resources(source, "AWS::S3::Bucket")
    report_id = next(k for k in buckets if k.startswith("ReportsBucket"))
    logs_id = next(k for k in buckets if k.startswith("ReportsAccessLogs"))
    for bucket in buckets.values():
        props = bucket["Properties"]
        assert props["PublicAccessBlockConfiguration"] == {
            "BlockPublicAcls": True,
            "BlockPublicPolicy": True,
            "IgnorePublicAcls": True,
            "RestrictPublicBuckets": True,
        }
        rule = props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]
        assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
        assert bucket["DeletionPolicy"] == "Retain"
    report = buckets[report_id]["Properties"]
    assert ref_id(report["LoggingConfiguration"]["DestinationBucketName"]) == logs_id
    # Every run's report stays (design.md, The ledger): the record that outlives the ledger's retention.
    rules = report["LifecycleConfiguration"]["Rules"]
    assert not [r for r in rules if "ExpirationInDays" in r or "ExpirationDate" in r], rules
    tls_only = {
        ref_id(p["Properties"]["Bucket"])
        for p in resources(source, "AWS::S3::BucketPolicy").values()
        for s in p["Properties"]["PolicyDocument"]["Statement"]
        if s["Effect"] == "Deny" and s.get("Condition") == {"Bool": {"aws:SecureTransport": "false"}}
    }
    assert tls_only == set(buckets)


def test_no_custom_resources(all_templates: dict[str, dict[str, Any]]) -> None:
    """Nothing may need a Lambda run at deploy time (AwsCustomResource, autoDeleteObjects, ...)."""
    for template in all_templates.values():
        types = {r["Type"] for r in template["Resources"].values()}
        assert not {t for t in types if t.startswith("Custom::")}
        assert "AWS::CloudFormation::CustomResource" not in types
        assert "AWS::Lambda::LayerVersion" not in types
        # The only functions are the handlers (custom resource providers would add their own).
        for props in (r["Properties"] for r in resources(template, "AWS::Lambda::Function").values()):
            assert props["Handler"] in HANDLERS.values()
        targets = {*resources(template, "AWS::Lambda::Function"), _queue(template, "AmiEventsQueue")}
        for rule in resources(template, "AWS::Events::Rule").values():
            for target in rule["Properties"]["Targets"]:
                assert ref_id(target["Arn"]) in targets


def test_ami_state_change_rule_takes_only_its_own_regions_events(
    all_templates: dict[str, dict[str, Any]],
) -> None:
    # A bus may receive other regions' events too (a cross-Region event bus target forwards them with
    # their own `region`). The handler refuses an event of another region (BadEvent): queued, it would
    # fail its five deliveries in the region's one FIFO message group, holding back this region's
    # events behind it, then land in the dead-letter queue and alarm.
    for name, template in all_templates.items():
        region = name.removeprefix("AmiJanitor-")
        [pattern] = [
            rule["Properties"]["EventPattern"]
            for rule in resources(template, "AWS::Events::Rule").values()
            if "EventPattern" in rule["Properties"]
        ]
        assert pattern.get("region") == [region], f"{name}: the AMI state-change rule matches {pattern}"
