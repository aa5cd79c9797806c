"""The usage inbox: made by the first region's stack in the owner's account, written by the organization's
janitors each under its own account, read by them all."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any

import pytest
from aws_cdk import Stack
from aws_cdk.assertions import Annotations, Capture, Match, Template
from synth_support import TEST_ACCOUNT, Synth, as_list, cdk_context, flatten, resources

from ami_janitor.core.policy import Policy, parse_policy

pytestmark = pytest.mark.slow  # synthesizes the stacks (or reads their synthesized templates)

REPORT_WRITES = [
    "s3:DeleteObject",
    "s3:DeleteObjectVersion",
    "s3:PutObject",
    "s3:ReplicateDelete",
    "s3:ReplicateObject",
]
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
                            # No expiry: a report that vanished would read as missing ("not used"
                            # under `required: false`); a stale one keeps its AMIs.
                            {
                                "Prefix": "janitor/reports/",
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
                    # The owner's account too: its identity policies alone would let it write.
                    {
                        "Sid": "DenyWritesOutsideOwnReports",
                        "Effect": "Deny",
                        "Principal": {"AWS": "*"},
                        "Action": REPORT_WRITES,
                        "NotResource": _objects(inbox, "/janitor/reports/${aws:PrincipalAccount}/*"),
                    },
                    {
                        "Sid": "DenyWritesOutsideJanitors",
                        "Effect": "Deny",
                        "Principal": {"AWS": "*"},
                        "Action": REPORT_WRITES,
                        "Resource": _objects(inbox, "/*"),
                        "Condition": {
                            "ArnNotLike": {"aws:PrincipalArn": "arn:aws:iam::*:role/ami-janitor/*"}
                        },
                    },
                ],
            },
        },
    )


OWNER, MEMBER, OTHER_MEMBER = TEST_ACCOUNT, "222222222222", "333333333333"
ORGANIZATION = "o-a1b2c3d4e5"
OWNER_JANITOR = f"arn:aws:iam::{OWNER}:role/ami-janitor/AmiJanitor-us-east-1-ScheduledRunFunctionRole-A1"
OWNER_CI = f"arn:aws:iam::{OWNER}:role/ci-deploy"
MEMBER_JANITOR = f"arn:aws:iam::{MEMBER}:role/ami-janitor/StackSet-AmiJanitor-ScheduledRunFunctionRole-B2"
MEMBER_CI = f"arn:aws:iam::{MEMBER}:role/ci-deploy"
INBOX_ARN = "arn:aws:s3:::example-ami-usage"


def inbox_allows(
    template: dict[str, Any], action: str, key: str | None, principal: str, organization: str = ORGANIZATION
) -> bool:
    """The inbox policy's answer, by IAM's rules, to a principal whose identity policy grants `action`
    on every resource (a CI role with s3:PutObject on *): in the inbox's account that grant is enough
    unless a Deny applies; from another account the bucket policy must allow as well. `key` None
    asks about the bucket itself (ListBucket)."""
    account = principal.split(":")[4]
    context = {
        "aws:PrincipalArn": principal,
        "aws:PrincipalAccount": account,
        "aws:PrincipalOrgID": organization,
        "aws:SecureTransport": "true",
    }
    requested = INBOX_ARN if key is None else f"{INBOX_ARN}/{key}"

    def resource_matches(patterns: Any) -> bool:
        arns = [
            re.sub(r"<UsageInboxBucket\w+>", INBOX_ARN, flatten(p)).replace(
                "${aws:PrincipalAccount}", account
            )
            for p in as_list(patterns)
        ]
        return any(fnmatch.fnmatchcase(requested, arn) for arn in arns)

    held = {
        "StringEquals": lambda got, wanted: got in wanted,
        "Bool": lambda got, wanted: got in wanted,
        "ArnLike": lambda got, wanted: any(fnmatch.fnmatchcase(got, w) for w in wanted),
        "ArnNotLike": lambda got, wanted: not any(fnmatch.fnmatchcase(got, w) for w in wanted),
    }

    def applies(statement: dict[str, Any]) -> bool:
        return (
            statement["Principal"] == {"AWS": "*"}
            and any(fnmatch.fnmatchcase(action, a) for a in as_list(statement["Action"]))
            and (
                resource_matches(statement["Resource"])
                if "Resource" in statement
                else not resource_matches(statement["NotResource"])
            )
            and all(
                held[operator](context[key], as_list(wanted))
                for operator, keys in statement.get("Condition", {}).items()
                for key, wanted in keys.items()
            )
        )

    [inbox_policy] = [
        p
        for name, p in resources(template, "AWS::S3::BucketPolicy").items()
        if name.startswith("UsageInboxBucketPolicy")
    ]
    statements = [s for s in inbox_policy["Properties"]["PolicyDocument"]["Statement"] if applies(s)]
    if any(s["Effect"] == "Deny" for s in statements):
        return False
    return account == OWNER or any(s["Effect"] == "Allow" for s in statements)


def test_only_janitors_write_and_only_under_their_own_account(org_synth: Synth, org_policy: Policy) -> None:
    template = org_synth.template("AmiJanitor-us-east-1")
    reports = org_policy.usage_reports
    assert reports is not None

    def report(account: str) -> str:
        return reports.report_key(account, "us-east-1")  # the key the scheduled run writes and reads

    assert report(MEMBER) == f"janitor/reports/{MEMBER}/us-east-1.json"
    # In the owner's account, a role whose own policy grants s3:PutObject and s3:DeleteObject on *
    # forges no report, of another account or of its own, and deletes none; it still reads.
    assert not inbox_allows(template, "s3:PutObject", report(MEMBER), OWNER_CI)
    assert not inbox_allows(template, "s3:PutObject", report(OWNER), OWNER_CI)
    assert not inbox_allows(template, "s3:DeleteObject", report(MEMBER), OWNER_CI)
    # Nor by deleting a report's version (the "null" one of an unversioned bucket), nor by replication.
    assert not inbox_allows(template, "s3:DeleteObjectVersion", report(MEMBER), OWNER_CI)
    assert not inbox_allows(template, "s3:ReplicateObject", report(MEMBER), OWNER_CI)
    assert not inbox_allows(template, "s3:ReplicateDelete", report(MEMBER), OWNER_CI)
    assert inbox_allows(template, "s3:GetObject", report(MEMBER), OWNER_CI)
    # The owner's janitor writes its own report and reads the members'.
    assert inbox_allows(template, "s3:PutObject", report(OWNER), OWNER_JANITOR)
    assert not inbox_allows(template, "s3:PutObject", report(MEMBER), OWNER_JANITOR)
    assert not inbox_allows(template, "s3:DeleteObject", report(MEMBER), OWNER_JANITOR)
    assert inbox_allows(template, "s3:GetObject", report(MEMBER), OWNER_JANITOR)
    assert inbox_allows(template, "s3:ListBucket", None, OWNER_JANITOR)
    # A member's janitor writes its own report only, and reads the others'.
    assert inbox_allows(template, "s3:PutObject", report(MEMBER), MEMBER_JANITOR)
    assert not inbox_allows(template, "s3:PutObject", report(OTHER_MEMBER), MEMBER_JANITOR)
    assert not inbox_allows(template, "s3:PutObject", f"janitor/{MEMBER}/us-east-1.json", MEMBER_JANITOR)
    assert not inbox_allows(template, "s3:DeleteObject", report(MEMBER), MEMBER_JANITOR)
    assert inbox_allows(template, "s3:GetObject", report(OTHER_MEMBER), MEMBER_JANITOR)
    # Nobody else in a member account, nor a janitor of another organization.
    assert not inbox_allows(template, "s3:PutObject", report(MEMBER), MEMBER_CI)
    assert not inbox_allows(template, "s3:PutObject", report(MEMBER), MEMBER_JANITOR, "o-zz99yy88xx")
    assert not inbox_allows(template, "s3:GetObject", report(OWNER), MEMBER_JANITOR, "o-zz99yy88xx")


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
    from ami_janitor import roles

    declared = {**roles.FUNCTIONS, "operator": roles.OPERATOR_PERMISSIONS}
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
                owner = {"StringEquals": {"s3:ResourceAccount": TEST_ACCOUNT}}  # inbox_account
                expected = {"Sid": sid, "Effect": "Allow", **expected_statements[sid], "Condition": owner}
                assert flat == expected, (name, module)


def test_every_inbox_statement_holds_to_the_inbox_account(org_synth: Synth) -> None:
    """With usage_reports.inbox_account, no role's statement on the inbox reaches a bucket of that
    name in another account, whether or not the call passes ExpectedBucketOwner."""
    templates = [org_synth.template(n) for n in org_synth.stack_names() if n.startswith("AmiJanitor-")]
    for template in [*templates, org_synth.member_template()]:
        for sid in USAGE_SIDS.values():
            owner = Capture()
            Template.from_json(template).has_resource_properties(
                "AWS::IAM::Role",
                {
                    "Policies": Match.array_with(
                        [
                            Match.object_like(
                                {
                                    "PolicyDocument": Match.object_like(
                                        {
                                            "Statement": Match.array_with(
                                                [
                                                    Match.object_like(
                                                        {"Sid": sid, "Condition": {"StringEquals": owner}}
                                                    )
                                                ]
                                            )
                                        }
                                    )
                                }
                            )
                        ]
                    )
                },
            )
            assert owner.as_object() == {"s3:ResourceAccount": TEST_ACCOUNT}, sid


@pytest.mark.parametrize(("account", "made"), [(TEST_ACCOUNT, True), ("111122223333", False)])
def test_the_owners_stack_makes_the_inbox_only_in_the_inbox_account(
    tmp_path: Path, org_policy: Policy, account: str, made: bool
) -> None:
    from infra.stack import build_app

    context = {**cdk_context(), "account": account}
    if made:
        build_app(org_policy, context=context, outdir=str(tmp_path), nag=False)
        return
    with pytest.raises(
        ValueError, match=r"usage_reports.inbox_account is 123456789012, but this stack makes"
    ):
        build_app(org_policy, context=context, outdir=str(tmp_path), nag=False)


def test_organizations_is_read_only_with_usage_reports(org_synth: Synth, synth: Synth) -> None:
    """Organizations expands a share to an organization or OU into the accounts whose usage reports
    count: with `usage_reports` the roles whose code reads it get it (on "*", it has no resource ARN);
    without, no role does (in the management account it would list the whole organization)."""
    from ami_janitor.aws import usage

    reads = set(usage.ORGANIZATIONS_PERMISSIONS)
    scheduled = org_synth.template(next(n for n in org_synth.stack_names() if n.startswith("AmiJanitor-")))
    [role] = [
        r
        for k, r in resources(scheduled, "AWS::IAM::Role").items()
        if k.startswith(ROLE_PREFIXES["scheduled"])
    ]
    statements = [s for p in role["Properties"]["Policies"] for s in p["PolicyDocument"]["Statement"]]
    [organization] = [s for s in statements if s.get("Sid") == "ReadOrganization"]
    assert set(as_list(organization["Action"])) == reads and organization["Resource"] == "*"
    for name in synth.stack_names():  # the test policy without usage_reports
        for key, resource in resources(synth.template(name), "AWS::IAM::Role").items():
            granted = {
                a
                for p in resource["Properties"].get("Policies", [])
                for s in p["PolicyDocument"]["Statement"]
                for a in as_list(s["Action"])
            }
            assert not granted & reads, key
