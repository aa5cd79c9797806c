"""Each function's role: exactly its actions in ami_janitor.roles (the PERMISSIONS of the code it runs) plus
the listed infra extras, scoped."""

from __future__ import annotations

from typing import Any

import pytest
from infra.permissions import (
    CREATE_ACTIONS,
    RETIRE_ACTIONS,
    SNAPSHOT_DELETE_ACTIONS,
    TAG_ACTIONS,
    USAGE_ACTIONS,
    is_read_only,
)
from synth_support import (
    TEST_ACCOUNT,
    ServiceAuthorization,
    Synth,
    as_list,
    flatten,
    functions_by_handler,
    ref_id,
    resources,
)

from ami_janitor.aws import ledger
from ami_janitor.roles import FUNCTIONS, OPERATOR_PERMISSIONS

# What each function needs from its own stack, on top of its actions in ami_janitor.roles.FUNCTIONS. A new
# entry here is a decision: say in infra/ which resource it is granted on.
LOGS = {"logs:CreateLogStream", "logs:PutLogEvents"}  # its own log group
INFRA_EXTRAS = {
    # reports bucket, alert topic, replication queue + the on-failure destination queue
    "scheduled": LOGS | {"s3:PutObject", "sns:Publish", "sqs:SendMessage"},
    # replication queue, and what its SQS event source mapping does with the role (the AMI event queue),
    # and the visibility of the records it tries again
    "ami_event": LOGS
    | {"sqs:SendMessage", "sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"}
    | {"sqs:ChangeMessageVisibility"},
    # what its SQS event source mapping does with the role, and the records it has no time left for:
    # sent again to its queue, or made visible again where that fails
    "replicate": LOGS
    | {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes", "sqs:ChangeMessageVisibility"}
    | {"sqs:SendMessage"},
    # the on-failure destination queue
    "bake": LOGS | {"sqs:SendMessage"},
    # its results beside the run's report and read back, the summary, what its event source mapping does
    "slices": LOGS
    | {"s3:PutObject", "s3:GetObject", "sns:Publish"}
    | {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"},
}


pytestmark = pytest.mark.slow  # synthesizes the stacks (or reads their synthesized templates)


def _statements(template: dict[str, Any], role_id: str) -> list[dict[str, Any]]:
    role = template["Resources"][role_id]["Properties"]
    return [s for policy in role.get("Policies", []) for s in policy["PolicyDocument"]["Statement"]]


def _roles(template: dict[str, Any]) -> dict[str, str]:
    """Handler module -> role logical id."""
    functions = functions_by_handler(template)
    return {module: str(ref_id(props["Role"])) for module, (_, props) in functions.items()}


@pytest.fixture(scope="module")
def templates(synth: Synth) -> dict[str, dict[str, Any]]:
    return {name: synth.template(name) for name in synth.stack_names()}


def _permissions(module: str, stack: str | None = None) -> set[str]:
    """The module's actions; in a stack of a region that is only a replicate target (not one of the test
    policy's regions), the replication worker never copies and has none."""
    if module == "replicate" and stack is not None and stack != "AmiJanitor-us-east-1":
        return set()
    return set(FUNCTIONS[module])


def _operator_role(template: dict[str, Any]) -> str:
    [role_id] = [k for k in resources(template, "AWS::IAM::Role") if k.startswith("OperatorRole")]
    return role_id


def test_one_role_per_function(templates: dict[str, dict[str, Any]]) -> None:
    for template in templates.values():
        roles = _roles(template)
        assert len(set(roles.values())) == len(roles)
        # Besides the functions' roles: the operator role the CLI assumes.
        assert set(resources(template, "AWS::IAM::Role")) == {*roles.values(), _operator_role(template)}
        for role_id in roles.values():
            trust = template["Resources"][role_id]["Properties"]["AssumeRolePolicyDocument"]["Statement"]
            assert [s["Principal"] for s in trust] == [{"Service": "lambda.amazonaws.com"}]


def test_role_actions_are_handler_permissions_plus_infra_extras(templates: dict[str, dict[str, Any]]) -> None:
    for name, template in templates.items():
        for module, role_id in _roles(template).items():
            granted = {a for s in _statements(template, role_id) for a in as_list(s["Action"])}
            # The test policy has no usage_reports: the inbox's S3 calls have nothing to apply to
            # (test_infra_usage_inbox.py checks them with an inbox).
            expected = (_permissions(module, name) - USAGE_ACTIONS) | INFRA_EXTRAS[module]
            assert granted == expected, (name, module, granted ^ expected)


# What DescribeImageReferences reads with the caller's own permissions (AWS's managed policy
# AmazonEC2ImageReferencesAccessPolicy): written out here, not taken from the code it checks.
IMAGE_REFERENCES_NEEDS = {
    "ec2:DescribeInstances",
    "ec2:DescribeLaunchTemplates",
    "ec2:DescribeLaunchTemplateVersions",
    "ssm:DescribeParameters",
    "ssm:GetParameters",
    "imagebuilder:ListImageRecipes",
    "imagebuilder:ListContainerRecipes",
    "imagebuilder:GetContainerRecipe",
}


def test_every_role_that_asks_describe_image_references_may_read_what_it_looks_at(
    templates: dict[str, dict[str, Any]],
) -> None:
    asking = 0
    for template in templates.values():
        for module, role_id in _roles(template).items():
            actions = {a for s in _statements(template, role_id) for a in as_list(s["Action"])}
            if "ec2:DescribeImageReferences" in actions:
                asking += 1
                assert actions >= IMAGE_REFERENCES_NEEDS, (module, sorted(IMAGE_REFERENCES_NEEDS - actions))
    assert asking >= 2  # the scheduled run and the slice worker, at least


def test_infra_extras_are_on_the_stacks_own_resources(templates: dict[str, dict[str, Any]]) -> None:
    for template in templates.values():
        queue = next(k for k in resources(template, "AWS::SQS::Queue") if k.startswith("ReplicationQueue"))
        work = next(k for k in resources(template, "AWS::SQS::Queue") if k.startswith("WorkSlicesQueue"))
        failed = next(k for k in resources(template, "AWS::SQS::Queue") if k.startswith("DeadLettersFailed"))
        events = next(k for k in resources(template, "AWS::SQS::Queue") if k.startswith("AmiEventsQueue"))
        bucket = next(k for k in resources(template, "AWS::S3::Bucket") if k.startswith("ReportsBucket"))
        topic = next(iter(resources(template, "AWS::SNS::Topic")))
        functions = functions_by_handler(template)
        for module, role_id in _roles(template).items():
            own_logs = ref_id(functions[module][1]["LoggingConfig"]["LogGroup"])
            for statement in _statements(template, role_id):
                targets = {flatten(r) for r in as_list(statement["Resource"])}
                for action in as_list(statement["Action"]):
                    service = action.split(":", 1)[0]
                    if service == "logs":
                        assert targets == {f"<{own_logs}>"}
                    elif action == "s3:GetObject":
                        assert module == "slices" and targets == {f"<{bucket}>/runs/*"}
                    elif service == "s3":
                        # Reports and slice results alone, under runs/ (the handlers' keys, below).
                        assert targets == {f"<{bucket}>/runs/*"}
                    elif service == "sns":
                        assert targets == {f"<{topic}>"}
                    elif action == "sqs:SendMessage":
                        # The replication worker sends again the requests it has no time left for.
                        sends = {"scheduled": {queue, work}, "ami_event": {queue}, "replicate": {queue}}.get(
                            module, set()
                        )
                        # The failed-invocations queue: the functions invoked asynchronously.
                        destinations = {failed} if module in ("scheduled", "bake") else set()
                        assert targets <= {f"<{q}>" for q in {*destinations, *sends}}, module
                    elif service == "sqs":
                        consumed = {"replicate": queue, "slices": work, "ami_event": events}[module]
                        assert targets == {f"<{consumed}>"}


def test_every_report_key_is_under_the_prefix_the_roles_may_write() -> None:
    from ami_janitor.handlers.scheduled import report_key
    from ami_janitor.handlers.slices import slice_key

    keys = [report_key("us-east-1", "2026-12-03T03:00:00Z"), report_key("us-east-1", "r", part="run")]
    assert all(key.startswith("runs/") for key in [*keys, slice_key("us-east-1", "r", 7)])


def test_mutating_ec2_actions_are_scoped_and_conditioned(
    templates: dict[str, dict[str, Any]], infra_policy: Any
) -> None:
    targets = {t.region for f in infra_policy.families for t in f.replicate}
    for name, template in templates.items():
        region = name.removeprefix("AmiJanitor-")
        for module, role_id in _roles(template).items():
            for statement in _statements(template, role_id):
                actions = as_list(statement["Action"])
                mutating = [a for a in actions if a.startswith("ec2:") and not is_read_only(a)]
                if not mutating:
                    continue
                condition = statement.get("Condition", {})
                arns = [flatten(r) for r in as_list(statement["Resource"])]
                assert "*" not in arns
                regions = {arn.split(":")[3] for arn in arns}
                copies = "ec2:CopyImage" in actions or "ec2:CreateAction" in condition.get("StringEquals", {})
                allowed = {region} | (targets if module == "replicate" and copies else set())
                assert regions <= allowed, (module, statement)
                for arn in arns:
                    assert arn.split(":")[1] == "aws"
                    kind = arn.split(":")[5].split("/")[0]
                    assert kind in {"image", "snapshot", "instance"}
                    # Images and snapshots carry no account in their ARN (Service Authorization Reference).
                    assert (arn.split(":")[4] == "") == (kind != "instance"), arn
                if set(actions) & RETIRE_ACTIONS:
                    assert condition == {"Null": {"aws:ResourceTag/ami-janitor:candidate-since": "false"}}
                if set(actions) & SNAPSHOT_DELETE_ACTIONS:
                    assert condition == {"Null": {"aws:ResourceTag/ami-janitor:retired-from": "false"}}
                if set(actions) & TAG_ACTIONS:
                    if "ec2:CreateAction" in condition.get("StringEquals", {}):
                        created_by = as_list(condition["StringEquals"]["ec2:CreateAction"])
                        assert {f"ec2:{a}" for a in created_by} <= CREATE_ACTIONS
                        assert actions == ["ec2:CreateTags"]
                    else:
                        keys = condition["ForAllValues:StringLike"]["aws:TagKeys"]
                        latest = {f.latest.tag for f in infra_policy.families if f.latest and f.latest.tag}
                        assert set(keys) == {"ami-janitor:*"} | latest
                        assert condition["Null"] == {"aws:TagKeys": "false"}


def test_roles_that_only_create_amis_tag_only_what_they_create(templates: dict[str, dict[str, Any]]) -> None:
    """The bake and the copier tag their new AMI at creation: neither may change a tag (a janitor key, a
    Latest tag) on an existing AMI or snapshot."""
    seen = set()
    for template in templates.values():
        for module, role_id in _roles(template).items():
            if module not in ("bake", "replicate"):
                continue
            seen.add(module)
            for statement in _statements(template, role_id):
                if set(as_list(statement["Action"])) & TAG_ACTIONS:
                    assert "ec2:CreateAction" in statement.get("Condition", {}).get("StringEquals", {}), (
                        module,
                        statement,
                    )
    assert seen == {"bake", "replicate"}


def test_kms_only_on_configured_key_arns(templates: dict[str, dict[str, Any]], infra_policy: Any) -> None:
    configured = {
        t.kms_key_id for f in infra_policy.families for t in f.replicate if t.kms_key_id and not t.kms_alias
    }
    assert len(configured) == 2
    for name, template in templates.items():
        for module, role_id in _roles(template).items():
            kms = [
                s
                for s in _statements(template, role_id)
                if any(a.startswith("kms:") for a in as_list(s["Action"]))
            ]
            wanted = {a for a in _permissions(module, name) if a.startswith("kms:")}
            assert bool(kms) == bool(wanted)
            by_arn = [s for s in kms if not s["Sid"].endswith("ByAlias")]
            # The keys named by ARN are EC2's to use while it copies: only a role that copies has them
            # (the others DescribeKey an alias to resolve it).
            assert bool(by_arn) == ("ec2:CopyImage" in _permissions(module, name)), module
            for statement in by_arn:
                assert all(a.startswith("kms:") for a in as_list(statement["Action"]))
                assert {flatten(r) for r in as_list(statement["Resource"])} == configured


def test_an_alias_target_needs_the_alias_on_the_key(templates: dict[str, dict[str, Any]]) -> None:
    """Every role that resolves the alias or copies with its key: any key of the target region that
    carries the alias, the EC2 calls through EC2 only."""
    for name, template in templates.items():
        for module, role_id in _roles(template).items():
            by_alias = [
                s for s in _statements(template, role_id) if str(s.get("Sid", "")).endswith("ByAlias")
            ]
            assert bool(by_alias) == ("kms:DescribeKey" in _permissions(module, name)), module
            for statement in by_alias:
                assert [flatten(r) for r in as_list(statement["Resource"])] == [
                    f"arn:aws:kms:us-west-2:{TEST_ACCOUNT}:key/*"
                ]
                condition = statement["Condition"]
                assert condition["ForAnyValue:StringEquals"] == {
                    "kms:ResourceAliases": ["alias/pettracker-key"]
                }
                if statement["Sid"] != "DescribeReplicaKeysByAlias":
                    assert condition["StringLike"] == {"kms:ViaService": "ec2.*.amazonaws.com"}


def test_no_wildcard_action_no_managed_policy(templates: dict[str, dict[str, Any]]) -> None:
    for template in templates.values():
        assert not resources(template, "AWS::IAM::ManagedPolicy")
        assert not resources(template, "AWS::IAM::Policy")  # every grant is inline, visible on its role
        for role_id, role in resources(template, "AWS::IAM::Role").items():
            assert "ManagedPolicyArns" not in role["Properties"]
            for statement in _statements(template, role_id):
                assert statement["Effect"] == "Allow"
                for action in as_list(statement["Action"]):
                    assert "*" not in action, action


def test_statements_fit_the_service_authorization_reference(templates: dict[str, dict[str, Any]]) -> None:
    reference = ServiceAuthorization()
    for template in templates.values():
        for role_id in [*_roles(template).values(), _operator_role(template)]:
            for statement in _statements(template, role_id):
                if statement.get("Sid") == "RunShellDocument":
                    # An AWS-owned document: no account in its ARN (the reference's format has one).
                    [document] = [flatten(r) for r in as_list(statement["Resource"])]
                    assert document.endswith(":*:document/AWS-RunShellScript")
                    continue
                reference.check_statement(
                    as_list(statement["Action"]),
                    [flatten(r) for r in as_list(statement["Resource"])],
                    statement.get("Condition", {}),
                )


def test_every_role_lives_under_the_janitor_path(templates: dict[str, dict[str, Any]]) -> None:
    # The ledger's resource policy lets only principals under /ami-janitor/ write.
    for template in templates.values():
        roles = resources(template, "AWS::IAM::Role")
        assert roles
        for role in roles.values():
            assert role["Properties"]["Path"] == "/ami-janitor/"


def _table(region: str) -> str:
    return f"arn:aws:dynamodb:{region}:{TEST_ACCOUNT}:table/ami-janitor-ledger"


# On the copy targets' ledgers: the scheduled run reads them (its plan), the roles that copy record there.
TARGET_LEDGER_ACTIONS = {
    "scheduled": {"dynamodb:Scan"},  # its Scan says whether the table is there
    "replicate": {"dynamodb:BatchGetItem", "dynamodb:DescribeTable", "dynamodb:UpdateItem"},
    "operator": {"dynamodb:BatchGetItem", "dynamodb:DescribeTable", "dynamodb:Scan", "dynamodb:UpdateItem"},
}


def test_ledger_calls_only_on_the_ledger_tables_of_the_region_and_its_copy_targets(
    templates: dict[str, dict[str, Any]], infra_policy: Any
) -> None:
    targets = {t.region for f in infra_policy.families for t in f.replicate}
    for name, template in templates.items():
        region = name.removeprefix("AmiJanitor-")
        remote = sorted(_table(r) for r in targets - {region})
        roles = {**_roles(template), "operator": _operator_role(template)}
        for module, role_id in roles.items():
            statements = [
                s
                for s in _statements(template, role_id)
                if any(a.startswith("dynamodb:") for a in as_list(s["Action"]))
            ]
            wanted = set(OPERATOR_PERMISSIONS if module == "operator" else _permissions(module, name))
            assert {a for s in statements for a in as_list(s["Action"])} == {
                a for a in wanted if a.startswith("dynamodb:")
            }, module
            if not statements:
                continue  # the replication worker of a region that is only a copy target: no ledger call
            own = [s for s in statements if [flatten(r) for r in as_list(s["Resource"])] == [_table(region)]]
            assert len(own) == 1, module
            others = [s for s in statements if s not in own]
            expected = TARGET_LEDGER_ACTIONS.get(module, set()) if remote else set()
            assert {a for s in others for a in as_list(s["Action"])} == expected, (name, module)
            for statement in others:
                assert sorted(flatten(r) for r in as_list(statement["Resource"])) == remote
            for statement in statements:
                assert all(a.startswith("dynamodb:") for a in as_list(statement["Action"]))
    # The scheduled run and the event function use the ledger; `ledger create` is the operator's.
    scheduled = _permissions("scheduled")
    assert set(ledger.PERMISSIONS) <= scheduled and set(ledger.PERMISSIONS) <= _permissions("ami_event")
    assert not set(ledger.CREATE_PERMISSIONS) & scheduled


def test_operator_role_is_the_clis_permissions_trusting_the_account(
    templates: dict[str, dict[str, Any]],
) -> None:
    for template in templates.values():
        role_id = _operator_role(template)
        role = template["Resources"][role_id]["Properties"]
        [trust] = role["AssumeRolePolicyDocument"]["Statement"]
        assert trust["Action"] == "sts:AssumeRole"
        assert flatten(trust["Principal"]["AWS"]) == f"arn:aws:iam::{TEST_ACCOUNT}:root"
        granted = {a for s in _statements(template, role_id) for a in as_list(s["Action"])}
        assert granted == set(OPERATOR_PERMISSIONS) - USAGE_ACTIONS  # no usage_reports: no inbox
        # The stack owns the table: no table administration (its resource policy least of all).
        assert not granted & set(ledger.CREATE_PERMISSIONS)
        assert {"dynamodb:PutResourcePolicy", "dynamodb:UpdateTable"}.isdisjoint(granted)
        outputs = template["Outputs"]
        assert ref_id(outputs["OperatorRoleArn"]["Value"]) == role_id


def test_the_bake_role_images_only_the_build_instances_of_families_that_bake_in_its_region(
    infra_policy: Any, tmp_path: Any
) -> None:
    # A family whose build instance lives in another region (bake.regions) is answered `not-here` by
    # this region's bake function before any EC2 call: its role needs nothing of that family's.
    import json

    from infra.stack import build_app
    from synth_support import cdk_context

    from ami_janitor.core.policy import Policy

    data = infra_policy.model_dump(mode="json", exclude_none=True)
    data["regions"] = ["us-east-1", "us-east-2"]
    data["families"][1]["bake"] = {
        "instance_tag": {"Role": "base-linux", "Stage": "build"},
        "regions": ["us-east-2"],
        "schedule": "cron(0 4 * * ? *)",
    }
    policy = Policy.model_validate(data)
    assert policy.bake_regions(policy.family("base-linux")) == ["us-east-2"]
    app = build_app(policy, context=cdk_context(), outdir=str(tmp_path), nag=False)
    template = app.synth().get_stack_by_name("AmiJanitor-us-east-1").template
    [(_, bake)] = [
        (k, v)
        for k, v in template["Resources"].items()
        if v["Type"] == "AWS::IAM::Role" and k.startswith("BakeScheduleFunctionRole")
    ]
    conditions = [
        s.get("Condition", {})
        for p in bake["Properties"]["Policies"]
        for s in p["PolicyDocument"]["Statement"]
        if s["Action"] == "ec2:CreateImage" and "instance/" in json.dumps(s["Resource"])
    ]
    assert {
        "StringEquals": {
            "aws:ResourceTag/Role": "pettracker-ml",
            "aws:RequestedRegion": ["us-east-1", "us-east-2"],
        }
    } in conditions
    assert all("base-linux" not in json.dumps(c) for c in conditions), (
        f"the us-east-1 bake role may image any us-east-1 instance tagged as base-linux's build instance, "
        f"which bakes only in us-east-2: {conditions}"
    )
