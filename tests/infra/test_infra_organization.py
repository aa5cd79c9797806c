"""Deployment to an organization: the StackSet, its one member template for every region, the code buckets.

moto's CloudFormation has no StackSet resource: the templates are asserted here (and linted in
test_infra_cfn_lint.py, checked by cdk-nag in test_infra_nag.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aws_cdk import App, Stack
from aws_cdk.assertions import Capture, Match, Template
from synth_support import Synth, as_list, cdk_context, flatten, functions_by_handler, ref_id, resources

from ami_janitor.core.policy import Policy

pytestmark = pytest.mark.slow  # synthesizes the stacks (or reads their synthesized templates)

ORG = "AmiJanitorOrg"
MANAGED = ["eu-west-1", "us-east-1", "us-east-2"]  # regions [us-east-1, us-east-2] and the target eu-west-1
CODE_BUCKET = {"Fn::Join": ["-", ["example-ami-janitor-code", {"Ref": "AWS::Region"}]]}
BAKE_CONDITION = {
    "Fn::Or": [
        {"Fn::Equals": [{"Ref": "AWS::Region"}, "us-east-1"]},
        {"Fn::Equals": [{"Ref": "AWS::Region"}, "us-east-2"]},
    ]
}


@pytest.fixture(scope="module")
def member(org_synth: Synth) -> dict[str, Any]:
    return org_synth.member_template()


def _code_asset_key(synth: Synth, stack: str) -> str:
    """The object key `cdk deploy` gives a regional stack's code asset in the bootstrap bucket."""
    [key] = [
        destination["objectKey"]
        for entry in synth.assets(stack)["files"].values()
        if entry["source"].get("packaging") == "zip"
        for destination in entry["destinations"].values()
    ]
    return str(key)


def test_the_app_adds_code_buckets_and_the_stack_set_stack(org_synth: Synth, org_policy: Policy) -> None:
    assert org_policy.managed_regions == MANAGED
    assert org_synth.stack_names() == sorted(
        [*(f"AmiJanitor-{r}" for r in MANAGED), *(f"AmiJanitorCode-{r}" for r in MANAGED), ORG]
    )
    artifacts = org_synth.manifest["artifacts"]
    # The StackSet is made in the first region of the policy, the code buckets in every managed region.
    assert artifacts[ORG]["environment"] == "aws://unknown-account/us-east-1"
    for region in MANAGED:
        assert artifacts[f"AmiJanitorCode-{region}"]["environment"] == f"aws://unknown-account/{region}"
    # One member template, written beside the stacks (not a stack of its own: `cdk deploy` skips it).
    [member_file] = org_synth.stack_set_templates()
    assert member_file.name not in artifacts


def test_stack_set_is_service_managed_and_deploys_to_the_ous_in_every_managed_region(
    org_synth: Synth, org_policy: Policy
) -> None:
    assert org_policy.organization is not None
    template = Template.from_json(org_synth.template(ORG))
    url = Capture()
    template.has_resource_properties(
        "AWS::CloudFormation::StackSet",
        {
            "StackSetName": "AmiJanitor",
            "PermissionModel": "SERVICE_MANAGED",
            # Called from the management account (the context flag stackset_delegated_admin says otherwise).
            "CallAs": "SELF",
            "AutoDeployment": {"Enabled": True, "RetainStacksOnAccountRemoval": True},
            "Capabilities": ["CAPABILITY_NAMED_IAM"],
            "StackInstancesGroup": [
                {
                    "DeploymentTargets": {
                        "AccountFilterType": "NONE",
                        "OrganizationalUnitIds": ["ou-ab12-cdef3456", "r-ab12"],
                    },
                    "Regions": MANAGED,
                }
            ],
            # Exact: the default concurrency mode (STRICT_FAILURE_TOLERANCE) would deploy to a tenth of
            # the accounts plus one at a time, whatever MaxConcurrentPercentage says.
            "OperationPreferences": Match.exact(
                {
                    "RegionConcurrencyType": "PARALLEL",
                    "MaxConcurrentPercentage": 25,
                    "FailureTolerancePercentage": 10,
                    "ConcurrencyMode": "SOFT_FAILURE_TOLERANCE",
                }
            ),
            "TemplateURL": {"Fn::Sub": url},
        },
    )
    # The TemplateURL is the member template, published as a file asset of this stack.
    [member_file] = org_synth.stack_set_templates()
    [entry] = [e for e in org_synth.assets(ORG)["files"].values() if e["source"]["path"] == member_file.name]
    [destination] = entry["destinations"].values()
    assert url.as_string().endswith(f"/{destination['bucketName']}/{destination['objectKey']}")


@pytest.mark.parametrize(("flag", "call_as"), [("true", "DELEGATED_ADMIN"), ("false", "SELF")])
def test_stack_set_called_as_a_delegated_administrator_with_the_context_flag(
    org_policy: Policy, tmp_path: Path, flag: str, call_as: str
) -> None:
    """`cdk deploy AmiJanitorOrg -c stackset_delegated_admin=true` from a delegated administrator of
    StackSets: CloudFormation refuses a service-managed StackSet called as SELF outside the management
    account."""
    from infra.stack import build_app

    app = build_app(
        org_policy,
        context={**cdk_context(), "stackset_delegated_admin": flag},
        outdir=str(tmp_path),
        nag=False,
    )
    [org] = [child for child in app.node.children if isinstance(child, Stack) and child.stack_name == ORG]
    Template.from_stack(org).has_resource_properties(
        "AWS::CloudFormation::StackSet", {"PermissionModel": "SERVICE_MANAGED", "CallAs": call_as}
    )


def test_no_custom_resource_and_no_asset_copy(org_synth: Synth, member: dict[str, Any]) -> None:
    """cdk-stacksets copies Lambda assets with a BucketDeployment (a Lambda-backed custom resource): the
    member has no file asset, so none is made, and no stack has a custom resource."""
    templates = {name: org_synth.template(name) for name in org_synth.stack_names()}
    templates["member"] = member
    for name, template in templates.items():
        for logical_id, resource in template["Resources"].items():
            kind = resource["Type"]
            assert not kind.startswith("Custom::"), (name, logical_id)
            assert kind != "AWS::CloudFormation::CustomResource", (name, logical_id)
            assert "BucketDeployment" not in logical_id, (name, logical_id)
            if not name.startswith("AmiJanitor-") and name != "member":
                assert kind != "AWS::Lambda::Function", (name, logical_id)
    # The StackSet's stack publishes its own template and the member's, nothing else: no code zip.
    packaging = {e["source"]["packaging"] for e in org_synth.assets(ORG)["files"].values()}
    assert packaging == {"file"}
    assert len(org_synth.assets(ORG)["files"]) == 2


def test_member_functions_read_the_zip_from_their_regions_code_bucket(
    org_synth: Synth, member: dict[str, Any]
) -> None:
    functions = resources(member, "AWS::Lambda::Function")
    assert {module for module in functions_by_handler(member)} == {
        "scheduled",
        "ami_event",
        "replicate",
        "slices",
        "bake",
    }
    # The key `cdk deploy` gives the regional stacks' asset: the same zip, wherever it is read from.
    key = _code_asset_key(org_synth, "AmiJanitor-us-east-1")
    for region in MANAGED:
        assert _code_asset_key(org_synth, f"AmiJanitor-{region}") == key
    for function in functions.values():
        assert function["Properties"]["Code"] == {"S3Bucket": CODE_BUCKET, "S3Key": key}


def test_member_template_serves_every_region(member: dict[str, Any]) -> None:
    """No parameter to fill per region (the one parameter, with its default, is per account); the bake
    schedule exists only in policy.regions (a condition)."""
    assert list(member["Parameters"]) == ["LedgerTableExists"]
    assert member["Conditions"]["BakeRegion"] == BAKE_CONDITION
    conditioned = {k for k, v in member["Resources"].items() if v.get("Condition") == "BakeRegion"}
    assert conditioned == {k for k in member["Resources"] if k.startswith("BakeSchedule")}
    # Its rules' delivery failures go to a queue of its own, within the condition.
    bake = Template.from_json(member)
    bake.has_resource(
        "AWS::Events::Rule",
        {
            "Condition": "BakeRegion",
            "Properties": Match.object_like(
                {
                    "Targets": [
                        Match.object_like(
                            {
                                "DeadLetterConfig": {
                                    "Arn": {
                                        "Fn::GetAtt": [
                                            Match.string_like_regexp("^BakeScheduleEventTargets"),
                                            "Arn",
                                        ]
                                    }
                                }
                            }
                        )
                    ]
                }
            ),
        },
    )
    # Nothing outside the condition names a resource inside it.
    for logical_id, resource in member["Resources"].items():
        if logical_id in conditioned:
            continue
        assert not _references(resource, conditioned), logical_id
    for name, output in member.get("Outputs", {}).items():
        assert not _references(output, conditioned), name


def _references(value: Any, ids: set[str]) -> bool:
    if isinstance(value, dict):
        if ref_id(value) in ids:
            return True
        return any(_references(v, ids) for v in value.values())
    if isinstance(value, list):
        return any(_references(v, ids) for v in value)
    return False


def _role_statements(template: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Role logical id -> its statements, resources flattened (pseudo parameters as <AWS::...>)."""
    out = {}
    for role_id, role in resources(template, "AWS::IAM::Role").items():
        statements = []
        for policy in role["Properties"].get("Policies", []):
            for statement in policy["PolicyDocument"]["Statement"]:
                flat = dict(statement)
                # Sorted: CDK orders a statement's literal ARNs before those with a token.
                flat["Resource"] = sorted(_flat(r) for r in as_list(statement["Resource"]))
                statements.append(flat)
        out[role_id] = statements
    return out


def _flat(value: Any) -> str:
    # flatten() fills in the account and partition; the region stays visible as <AWS::Region>.
    return flatten(value).replace("<AWS::Region>", "REGION")


def test_member_roles_are_the_regional_stacks_with_the_region_as_a_pseudo_parameter(
    org_synth: Synth, member: dict[str, Any]
) -> None:
    """The regional stack of a source region (whose roles test_infra_iam checks action by action) and
    the member template grant the same statements to the same roles, the region aside."""
    regional = _role_statements(org_synth.template("AmiJanitor-us-east-1"))
    in_member = _role_statements(member)
    assert set(in_member) == set(regional)
    for role_id, statements in regional.items():
        expected = [
            {**s, "Resource": sorted(r.replace(":us-east-1:", ":REGION:") for r in s["Resource"])}
            for s in statements
        ]
        # The scheduled bake's role in the template for any region has the build instance of every
        # family that bakes anywhere, each limited to its bake regions (aws:RequestedRegion); the
        # regional stack has those that bake in its region alone.
        here = [s for s in in_member[role_id] if "us-east-1" in _requested_regions(s)]
        assert here == expected, role_id
    bake = next(r for r in in_member if r.startswith("BakeScheduleFunctionRole"))
    assert [
        _requested_regions(s) for s in in_member[bake] if s["Sid"].startswith("CreateImagesFromInstances")
    ] == [
        ["us-east-1", "us-east-2"],
        ["us-east-2"],
    ]
    roles = resources(member, "AWS::IAM::Role")
    assert {role["Properties"]["Path"] for role in roles.values()} == {"/ami-janitor/"}
    # Scoped to the region the stack instance is in: the mutating EC2 calls name AWS::Region.
    scheduled = next(r for r in roles if r.startswith("ScheduledRunFunctionRole"))
    restore = next(s for s in in_member[scheduled] if s["Sid"] == "RestoreAndShareImages")
    assert restore["Resource"] == ["arn:aws:ec2:REGION::image/*"]


def _requested_regions(statement: dict[str, Any]) -> list[str]:
    """The regions a statement is limited to (aws:RequestedRegion), or us-east-1's where it names none."""
    regions = statement.get("Condition", {}).get("StringEquals", {}).get("aws:RequestedRegion")
    return ["us-east-1"] if regions is None else ([regions] if isinstance(regions, str) else regions)


def test_member_ledger_accepts_the_stack_sets_execution_role(member: dict[str, Any]) -> None:
    [table] = resources(member, "AWS::DynamoDB::Table").values()
    [statement] = table["Properties"]["ResourcePolicy"]["PolicyDocument"]["Statement"]
    writers = [_flat(p) for p in statement["Condition"]["ArnNotLike"]["aws:PrincipalArn"]]
    assert writers == ["arn:aws:iam::*:role/ami-janitor/*", "arn:aws:iam::123456789012:role/stacksets-exec-*"]


def test_member_ledger_table_is_made_unless_the_account_has_one(
    org_synth: Synth, member: dict[str, Any]
) -> None:
    """An account whose table `ami-janitor ledger create` made before the StackSet reached it is
    deployed with LedgerTableExists=true: its stack uses that table (the functions' grants name the
    table by its ARN, never the resource)."""
    assert member["Parameters"]["LedgerTableExists"] == {
        "Type": "String",
        "Default": "false",
        "AllowedValues": ["false", "true"],
        "Description": "true where the account already has the ledger table ami-janitor-ledger",
    }
    [(name, table)] = resources(member, "AWS::DynamoDB::Table").items()
    assert member["Conditions"][table["Condition"]] == {"Fn::Equals": [{"Ref": "LedgerTableExists"}, "false"]}
    others = {k: v for k, v in member["Resources"].items() if k != name}
    assert name not in str(others)  # no Ref, GetAtt or DependsOn on a resource that may not exist
    for stack in [name for name in org_synth.stack_names() if name.startswith("AmiJanitor-")]:
        regional = org_synth.template(stack)
        assert "LedgerTableExists" not in regional.get("Parameters", {})
        assert all("Condition" not in t for t in resources(regional, "AWS::DynamoDB::Table").values())


def test_member_work_queues_are_named_for_the_stack_set(member: dict[str, Any]) -> None:
    names = {q["Properties"].get("QueueName") for q in resources(member, "AWS::SQS::Queue").values()} - {None}
    assert names == {
        "AmiJanitor-work.fifo",
        "AmiJanitor-work-dlq.fifo",
        "AmiJanitor-ami-events.fifo",
        "AmiJanitor-ami-events-dlq.fifo",
    }


@pytest.mark.parametrize("region", MANAGED)
def test_code_bucket_is_read_by_the_organization_only(org_synth: Synth, region: str) -> None:
    template = Template.from_json(org_synth.template(f"AmiJanitorCode-{region}"))
    bucket = Capture(Match.string_like_regexp("^CodeBucket"))
    template.has_resource_properties("AWS::S3::BucketPolicy", {"Bucket": {"Ref": bucket}})
    template.has_resource(
        "AWS::S3::Bucket",
        {
            "DeletionPolicy": "Retain",
            "Properties": Match.object_like(
                {
                    "BucketName": f"example-ami-janitor-code-{region}",
                    "PublicAccessBlockConfiguration": {
                        "BlockPublicAcls": True,
                        "BlockPublicPolicy": True,
                        "IgnorePublicAcls": True,
                        "RestrictPublicBuckets": True,
                    },
                    "OwnershipControls": {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]},
                    "LoggingConfiguration": Match.object_like({"LogFilePrefix": "code/"}),
                }
            ),
        },
    )
    template.has_resource_properties(
        "AWS::S3::BucketPolicy",
        {
            "Bucket": {"Ref": bucket.as_string()},
            "PolicyDocument": {
                "Version": "2012-10-17",
                "Statement": [
                    Match.object_like(
                        {"Effect": "Deny", "Condition": {"Bool": {"aws:SecureTransport": "false"}}}
                    ),
                    {
                        "Sid": "OrganizationReadsCode",
                        "Effect": "Allow",
                        "Principal": {"AWS": "*"},
                        "Action": "s3:GetObject",
                        "Resource": {"Fn::Join": ["", [{"Fn::GetAtt": [bucket.as_string(), "Arn"]}, "/*"]]},
                        "Condition": {"StringEquals": {"aws:PrincipalOrgID": "o-a1b2c3d4e5"}},
                    },
                ],
            },
        },
    )


@pytest.mark.parametrize(
    ("regions", "expected"),
    [
        (["us-east-1"], {"Fn::Equals": [{"Ref": "AWS::Region"}, "us-east-1"]}),
        (
            [f"r-{i}" for i in range(12)],
            {
                "Fn::Or": [
                    {"Fn::Or": [{"Fn::Equals": [{"Ref": "AWS::Region"}, f"r-{i}"]} for i in range(10)]},
                    {"Fn::Or": [{"Fn::Equals": [{"Ref": "AWS::Region"}, f"r-{i}"]} for i in (10, 11)]},
                ]
            },
        ),
        (
            [f"r-{i}" for i in range(11)],
            {
                "Fn::Or": [
                    {"Fn::Or": [{"Fn::Equals": [{"Ref": "AWS::Region"}, f"r-{i}"]} for i in range(10)]},
                    {"Fn::Equals": [{"Ref": "AWS::Region"}, "r-10"]},
                ]
            },
        ),
    ],
    ids=["one", "twelve", "eleven"],
)
def test_region_condition_nests_past_ten(regions: list[str], expected: dict[str, Any]) -> None:
    from infra.janitor import region_in

    stack = Stack(App(), "Conditions")
    assert stack.resolve(region_in(regions)) == expected


def _bake_rule_families(template: dict[str, Any]) -> list[str]:
    """The families whose scheduled bake the template's rules start (from each rule's input)."""
    found = []
    for rule in resources(template, "AWS::Events::Rule").values():
        for target in rule["Properties"]["Targets"]:
            transformer = target.get("InputTransformer")
            if transformer and '"family"' in transformer["InputTemplate"]:
                found.append(json.loads(transformer["InputTemplate"].replace("<time>", '"t"'))["family"])
    return sorted(found)


def test_a_family_is_baked_only_in_its_bake_regions(org_synth: Synth, member: dict[str, Any]) -> None:
    """base-linux pins a build instance of us-east-2 (bake.regions): no rule bakes it elsewhere. The
    member template, one for every region, has both rules where any family bakes; the function leaves
    a family to its own regions."""
    assert _bake_rule_families(org_synth.template("AmiJanitor-us-east-1")) == ["pettracker-ml"]
    assert _bake_rule_families(org_synth.template("AmiJanitor-us-east-2")) == ["base-linux", "pettracker-ml"]
    assert _bake_rule_families(org_synth.template("AmiJanitor-eu-west-1")) == []
    assert _bake_rule_families(member) == ["base-linux", "pettracker-ml"]
    assert member["Conditions"]["BakeRegion"] == BAKE_CONDITION


def _alarmed(template: dict[str, Any], metric: str) -> set[str | None]:
    """The resources an alarm on `metric` watches (a function's name, a queue's name)."""
    return {
        ref_id(dimension["Value"])
        for alarm in resources(template, "AWS::CloudWatch::Alarm").values()
        if alarm["Properties"].get("MetricName") == metric
        for dimension in alarm["Properties"]["Dimensions"]
    }


def _allows_events_from(template: dict[str, Any], queue: str, rule: str) -> bool:
    """The queue's policy lets EventBridge send the rule's failed deliveries."""
    return any(
        statement["Effect"] == "Allow"
        and statement["Principal"] == {"Service": "events.amazonaws.com"}
        and statement["Action"] == "sqs:SendMessage"
        and rule in {ref_id(arn) for arn in as_list(statement["Condition"]["ArnEquals"]["aws:SourceArn"])}
        for policy in resources(template, "AWS::SQS::QueuePolicy").values()
        if [ref_id(q) for q in policy["Properties"]["Queues"]] == [queue]
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]
    )


def test_member_template_has_the_safety_nets_of_the_regional_stacks(member: dict[str, Any]) -> None:
    """README, "Deploy": every EventBridge target a retry policy and a DLQ, every asynchronously invoked
    function bounded retries and an on-failure queue, every SQS source a redrive DLQ; an alarm on each
    function's errors and on each of those queues, all publishing to the region's topic. The member
    template composes the same constructs, but its bake rules have a queue of their own."""
    [topic] = resources(member, "AWS::SNS::Topic")
    alarms = resources(member, "AWS::CloudWatch::Alarm").values()
    assert all(alarm["Properties"]["AlarmActions"] == [{"Ref": topic}] for alarm in alarms)
    functions = resources(member, "AWS::Lambda::Function")
    assert _alarmed(member, "Errors") == set(functions)
    watched_queues = _alarmed(member, "ApproximateNumberOfMessagesVisible")
    for metric in ("ActionsFailed", "RegionSkipped"):
        assert _alarmed(member, metric) == {None}, metric  # dimension service=ami-janitor, no resource
    rules = resources(member, "AWS::Events::Rule")
    invoked_by_rules = set()
    for rule_id, rule in rules.items():
        for target in rule["Properties"]["Targets"]:
            retry = target["RetryPolicy"]
            assert 1 <= retry["MaximumRetryAttempts"] <= 10 and retry["MaximumEventAgeInSeconds"] <= 2 * 3600
            dead_letters = ref_id(target["DeadLetterConfig"]["Arn"])
            assert dead_letters in watched_queues, rule_id
            assert _allows_events_from(member, dead_letters, rule_id), rule_id
            # The queue exists wherever the rule does.
            assert member["Resources"][dead_letters].get("Condition") in (None, rule.get("Condition")), (
                rule_id
            )
            invoked_by_rules.add(ref_id(target["Arn"]))
    invoked_by_rules &= set(functions)  # (the AMI state changes go to a queue)
    assert {
        module for module, (fid, _) in functions_by_handler(member).items() if fid in invoked_by_rules
    } == {"scheduled", "bake"}
    # The AMI state changes go to the region's FIFO queue, which the event function consumes.
    events_queue = next(k for k in resources(member, "AWS::SQS::Queue") if k.startswith("AmiEventsQueue"))
    assert any(ref_id(t["Arn"]) == events_queue for r in rules.values() for t in r["Properties"]["Targets"])
    configs = {
        ref_id(c["Properties"]["FunctionName"]): c["Properties"]
        for c in resources(member, "AWS::Lambda::EventInvokeConfig").values()
    }
    assert set(configs) == invoked_by_rules
    for function_id, config in configs.items():
        assert config["Qualifier"] == "$LATEST" and config["MaximumRetryAttempts"] <= 2, function_id
        assert config["MaximumEventAgeInSeconds"] <= 2 * 3600, function_id
        on_failure = ref_id(config["DestinationConfig"]["OnFailure"]["Destination"])
        assert on_failure in watched_queues, function_id
        # Lambda sends the failure record with the function's own role.
        role = ref_id(functions[function_id]["Properties"]["Role"])
        assert any(
            "sqs:SendMessage" in as_list(s["Action"])
            and on_failure in {ref_id(r) for r in as_list(s["Resource"])}
            for policy in member["Resources"][role]["Properties"]["Policies"]
            for s in policy["PolicyDocument"]["Statement"]
        ), function_id
    mappings = resources(member, "AWS::Lambda::EventSourceMapping").values()
    assert {ref_id(m["Properties"]["FunctionName"]) for m in mappings} == set(functions) - invoked_by_rules
    for mapping in mappings:
        queue = member["Resources"][ref_id(mapping["Properties"]["EventSourceArn"])]["Properties"]
        assert ref_id(queue["RedrivePolicy"]["deadLetterTargetArn"]) in watched_queues
        assert 1 < queue["RedrivePolicy"]["maxReceiveCount"] <= 10
    # The event function rotates one batch at a time per region (one FIFO message group), with no
    # reserved concurrency, which a new account's Lambda quota of 10 would refuse.
    for _, function in functions_by_handler(member).values():
        assert "ReservedConcurrentExecutions" not in function
