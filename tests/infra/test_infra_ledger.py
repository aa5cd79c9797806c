"""The ledger table in each region's template: what moto's CloudFormation ignores (the resource policy,
PITR, TTL) is asserted here; and the context flag that references a table `ledger create` made."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aws_cdk import Stack
from aws_cdk.assertions import Capture, Match, Template
from synth_support import Synth, cdk_context, flatten, resources

from ami_janitor.aws import ledger
from ami_janitor.core.policy import parse_policy

pytestmark = pytest.mark.slow  # reads the synthesized templates


@pytest.fixture(scope="module")
def templates(synth: Synth) -> dict[str, dict[str, Any]]:
    return {name: synth.template(name) for name in synth.stack_names()}


def test_each_region_has_a_guarded_ledger_table(templates: dict[str, dict[str, Any]]) -> None:
    for template in templates.values():
        assertions = Template.from_json(template)
        assertions.resource_count_is("AWS::DynamoDB::Table", 1)
        assertions.has_resource(
            "AWS::DynamoDB::Table",
            {
                "DeletionPolicy": "Retain",
                "UpdateReplacePolicy": "Retain",
                "Properties": Match.object_like(
                    {
                        "TableName": "ami-janitor-ledger",
                        "BillingMode": "PAY_PER_REQUEST",
                        "DeletionProtectionEnabled": True,
                        "PointInTimeRecoverySpecification": {"PointInTimeRecoveryEnabled": True},
                        # AWS managed key (aws/dynamodb): SSE on, no customer key.
                        "SSESpecification": {"SSEEnabled": True},
                        "TimeToLiveSpecification": {"AttributeName": "ttl", "Enabled": True},
                        "KeySchema": [
                            {"AttributeName": "pk", "KeyType": "HASH"},
                            {"AttributeName": "sk", "KeyType": "RANGE"},
                        ],
                    }
                ),
            },
        )


def test_the_resource_policy_denies_writes_outside_the_janitor_path(
    templates: dict[str, dict[str, Any]],
) -> None:
    for name, template in templates.items():
        region = name.removeprefix("AmiJanitor-")
        principals = Capture()
        resource = Capture()
        Template.from_json(template).has_resource_properties(
            "AWS::DynamoDB::Table",
            {
                "ResourcePolicy": {
                    "PolicyDocument": {
                        "Version": "2012-10-17",
                        "Statement": [
                            {
                                "Sid": "DenyWritesOutsideAmiJanitor",
                                "Effect": "Deny",
                                "Principal": "*",
                                "Action": Match.array_with(
                                    [
                                        "dynamodb:BatchWriteItem",
                                        "dynamodb:DeleteItem",
                                        "dynamodb:DeleteTable",
                                        "dynamodb:PutItem",
                                        "dynamodb:UpdateItem",
                                        "dynamodb:UpdateTable",
                                    ]
                                ),
                                "Resource": resource,
                                "Condition": {"ArnNotLike": {"aws:PrincipalArn": principals}},
                            }
                        ],
                    }
                }
            },
        )
        assert principals.as_array()[0] == "arn:aws:iam::*:role/ami-janitor/*"
        # Besides the janitor's roles only the CDK deploy role (it updates the table on deploys).
        assert [flatten(p) for p in principals.as_array()[1:]] == [
            "arn:aws:iam::123456789012:role/cdk-*-cfn-exec-role-*"
        ]
        table = f"arn:aws:dynamodb:{region}:123456789012:table/ami-janitor-ledger"
        assert [flatten(r) for r in resource.as_array()] == [table, f"{table}/*"]
        [statement] = next(iter(resources(template, "AWS::DynamoDB::Table").values()))["Properties"][
            "ResourcePolicy"
        ]["PolicyDocument"]["Statement"]
        assert statement["Action"] == ledger.WRITE_ACTIONS  # the same list `ledger create` writes


def test_ledger_table_exists_context_references_the_table(tmp_path: Path) -> None:
    from infra.stack import build_app

    policy = parse_policy(
        {
            "regions": ["eu-west-1"],
            "ledger": {"table": "team-ledger"},
            "families": [{"name": "base", "match": {"name": "base-*"}}],
        }
    )
    context = {**cdk_context(), "account": "111122223333"}
    for flag, tables in (("true", 0), ("false", 1)):
        app = build_app(
            policy, context={**context, "ledger_table_exists": flag}, outdir=str(tmp_path), nag=False
        )
        [stack] = [child for child in app.node.children if isinstance(child, Stack)]
        template = Template.from_stack(stack)
        template.resource_count_is("AWS::DynamoDB::Table", tables)
        # The functions' grants name the table either way.
        assert "arn:aws:dynamodb:eu-west-1:111122223333:table/team-ledger" in str(template.to_json())
