"""The usage inbox: made by the first region's stack in the owner's account, written by the organization's
janitors each under its own account, read by them all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aws_cdk import Stack
from aws_cdk.assertions import Annotations, Capture, Match, Template
from synth_support import TEST_ACCOUNT, Synth, cdk_context, flatten, resources

from ami_janitor.core.policy import Policy, parse_policy

pytestmark = pytest.mark.slow  # synthesizes the stacks (or reads their synthesized templates)

JANITORS = {
    "StringEquals": {"aws:PrincipalOrgID": "o-a1b2c3d4e5"},
    "ArnLike": {"aws:PrincipalArn": "arn:aws:iam::*:role/ami-janitor/*"},
}


def _objects(bucket: str, suffix: str) -> dict[str, Any]:
    return {"Fn::Join": ["", [{"Fn::GetAtt": [bucket, "Arn"]}, suffix]]}


def test_only_the_first_regions_stack_makes_the_inbox(org_synth: Synth, org_policy: Policy) -> None:
    for region in org_policy.managed_regions:
        buckets = Template.from_json(org_synth.template(f"AmiJanitor-{region}")).find_resources(
            "AWS::S3::Bucket", {"Properties": {"BucketName": "example-ami-usage"}}
        )
        assert len(buckets) == (1 if region == org_policy.regions[0] else 0), region


def test_inbox_bucket(org_synth: Synth) -> None:
    template = Template.from_json(org_synth.template("AmiJanitor-us-east-1"))
    template.has_resource(
        "AWS::S3::Bucket",
        {
            "DeletionPolicy": "Retain",
            "UpdateReplacePolicy": "Retain",
            "Properties": Match.object_like(
                {
                    "BucketName": "example-ami-usage",
                    "PublicAccessBlockConfiguration": {
                        "BlockPublicAcls": True,
                        "BlockPublicPolicy": True,
                        "IgnorePublicAcls": True,
                        "RestrictPublicBuckets": True,
                    },
                    # Every report belongs to the inbox's owner, whichever account wrote it.
                    "OwnershipControls": {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]},
                    "BucketEncryption": {
                        "ServerSideEncryptionConfiguration": [
                            {"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}
                        ]
                    },
                    "LifecycleConfiguration": {
                        "Rules": [
                            {
                                "Prefix": "janitor/reports/",
                                "ExpirationInDays": 30,
                                "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
                                "Status": "Enabled",
                            }
                        ]
                    },
                    "LoggingConfiguration": Match.object_like({"LogFilePrefix": "inbox/"}),
                }
            ),
        },
    )


def test_inbox_policy_each_account_writes_under_its_own_id(org_synth: Synth) -> None:
    template = Template.from_json(org_synth.template("AmiJanitor-us-east-1"))
    bucket = Capture(Match.string_like_regexp("^UsageInboxBucket"))
    template.has_resource_properties("AWS::S3::BucketPolicy", {"Bucket": {"Ref": bucket}})
    inbox = bucket.as_string()
    template.has_resource_properties(
        "AWS::S3::BucketPolicy",
        {
            "Bucket": {"Ref": inbox},
            "PolicyDocument": {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Deny",
                        "Principal": {"AWS": "*"},
                        "Action": "s3:*",
                        "Resource": [{"Fn::GetAtt": [inbox, "Arn"]}, _objects(inbox, "/*")],
                        "Condition": {"Bool": {"aws:SecureTransport": "false"}},
                    },
                    {
                        "Sid": "JanitorsWriteOwnReports",
                        "Effect": "Allow",
                        "Principal": {"AWS": "*"},
                        "Action": "s3:PutObject",
                        "Resource": _objects(inbox, "/janitor/reports/${aws:PrincipalAccount}/*"),
                        "Condition": JANITORS,
                    },
                    {
                        "Sid": "JanitorsReadReports",
                        "Effect": "Allow",
                        "Principal": {"AWS": "*"},
                        "Action": "s3:GetObject",
                        "Resource": _objects(inbox, "/janitor/reports/*"),
                        "Condition": JANITORS,
                    },
                    {
                        "Sid": "JanitorsListReports",
                        "Effect": "Allow",
                        "Principal": {"AWS": "*"},
                        "Action": "s3:ListBucket",
                        "Resource": {"Fn::GetAtt": [inbox, "Arn"]},
                        # No prefix condition: a GetObject of a missing key is checked against it.
                        "Condition": JANITORS,
                    },
                ],
            },
        },
    )


def test_usage_reports_without_organization_makes_no_inbox(tmp_path: Path) -> None:
    from infra.stack import build_app

    policy = parse_policy(
        {
            "regions": ["eu-west-1"],
            "usage_reports": {"inbox": "s3://example-ami-usage"},
            "families": [{"name": "base", "match": {"name": "base-*"}}],
        }
    )
    app = build_app(policy, context=cdk_context(), outdir=str(tmp_path), nag=False)
    [stack] = [child for child in app.node.children if isinstance(child, Stack)]
    template = Template.from_stack(stack)
    assert not template.find_resources("AWS::S3::Bucket", {"Properties": {"BucketName": "example-ami-usage"}})
    Annotations.from_stack(stack).has_warning(
        "/AmiJanitor-eu-west-1", Match.string_like_regexp("usage_reports without organization: no inbox")
    )


USAGE_SIDS = {
    "s3:PutObject": "PublishUsageReport",
    "s3:GetObject": "ReadUsageReports",
    "s3:ListBucket": "ListUsageReports",
}
INBOX = "arn:aws:s3:::example-ami-usage"
ROLE_PREFIXES = {
    "scheduled": "ScheduledRunFunctionRole",
    "slices": "WorkSlicesWorkerRole",
    "ami_event": "AmiEventsFunctionRole",
    "replicate": "ReplicationWorkerRole",
    "bake": "BakeScheduleFunctionRole",
    "operator": "OperatorRole",
}


def _usage_statements(template: dict[str, Any], prefix: str) -> dict[str, dict[str, Any]]:
    [role] = [r for k, r in resources(template, "AWS::IAM::Role").items() if k.startswith(prefix)]
    statements = [s for p in role["Properties"]["Policies"] for s in p["PolicyDocument"]["Statement"]]
    return {s["Sid"]: s for s in statements if s.get("Sid") in USAGE_SIDS.values()}


def test_roles_use_the_inbox_as_their_code_declares(org_synth: Synth) -> None:
    """Each role's inbox statements are those of the S3 calls its code declares: the scheduled run
    publishes under its own account and reads, the slice worker reads, the others do not touch it."""
    from ami_janitor import engine
    from ami_janitor.handlers import ami_event, bake, replicate, scheduled, slices

    declared = {
        "scheduled": scheduled.PERMISSIONS,
        "slices": slices.PERMISSIONS,
        "ami_event": ami_event.PERMISSIONS,
        "replicate": replicate.PERMISSIONS,
        "bake": bake.PERMISSIONS,
        "operator": engine.CLI_PERMISSIONS,
    }
    assert {USAGE_SIDS[a] for a in declared["scheduled"] if a in USAGE_SIDS} == set(USAGE_SIDS.values())
    assert {USAGE_SIDS[a] for a in declared["slices"] if a in USAGE_SIDS} == {
        "ReadUsageReports",
        "ListUsageReports",
    }
    templates = {
        name: org_synth.template(name) for name in org_synth.stack_names() if name.startswith("AmiJanitor-")
    }
    templates["member"] = org_synth.member_template()
    expected_statements = {
        "PublishUsageReport": {
            "Action": "s3:PutObject",
            "Resource": f"{INBOX}/janitor/reports/{TEST_ACCOUNT}/*",
        },
        "ReadUsageReports": {"Action": "s3:GetObject", "Resource": f"{INBOX}/janitor/reports/*"},
        "ListUsageReports": {"Action": "s3:ListBucket", "Resource": INBOX},
    }
    for name, template in templates.items():
        for module, prefix in ROLE_PREFIXES.items():
            if module == "bake" and name in ("AmiJanitor-eu-west-1",):
                continue  # a replication target: no bake schedule
            found = _usage_statements(template, prefix)
            assert set(found) == {USAGE_SIDS[a] for a in declared[module] if a in USAGE_SIDS}, (name, module)
            for sid, statement in found.items():
                flat = {**statement, "Resource": flatten(statement["Resource"])}
                assert flat == {"Sid": sid, "Effect": "Allow", **expected_statements[sid]}, (name, module)
