"""The PERMISSIONS -> IAM statement mapping, without synthesizing anything."""

from __future__ import annotations

from typing import Any

import pytest
from infra.permissions import (
    MAX_INLINE_CHARACTERS,
    BuildInstanceScope,
    PermissionsError,
    Scope,
    Statement,
    inline_characters,
    require_inline_fits,
    statements_for,
)
from synth_support import ServiceAuthorization

from ami_janitor.core.policy import Family, UsageReports

ACCOUNT = "123456789012"
# Every kind of action the handlers may list.
EVERYTHING = [
    "autoscaling:DescribeAutoScalingGroups",
    "batch:DescribeComputeEnvironments",
    "cloudwatch:PutMetricData",
    "ec2:CopyImage",
    "ec2:CreateImage",
    "ec2:CreateTags",
    "ec2:DeleteSnapshot",
    "ec2:DeleteTags",
    "ec2:DeregisterImage",
    "ec2:DescribeImageReferences",
    "ec2:DescribeImages",
    "ec2:DisableImage",
    "ec2:DisableImageDeprecation",
    "ec2:EnableImage",
    "ec2:EnableImageDeprecation",
    "ec2:ModifyImageAttribute",
    "elasticmapreduce:ListClusters",
    "kms:CreateGrant",
    "kms:Decrypt",
    "kms:DescribeKey",
    "kms:GenerateDataKeyWithoutPlaintext",
    "kms:ReEncryptFrom",
    "kms:ReEncryptTo",
    "rbin:ListRules",
    "ssm:GetParameters",
    "ssm:PutParameter",
]


@pytest.fixture(scope="module")
def scope(infra_policy: Any) -> Scope:
    return Scope.from_policy(infra_policy, partition="aws", account=ACCOUNT, region="us-east-1", copies=True)


def _by_sid(statements: list[Statement]) -> dict[str, Statement]:
    sids = [s.sid for s in statements]
    assert len(sids) == len(set(sids))
    return {s.sid: s for s in statements}


def test_scope_from_policy(scope: Scope) -> None:
    assert scope.copy_regions == ("eu-west-1", "us-west-2")
    assert scope.latest_tag_keys == ("Current", "Latest")
    assert scope.kms_key_arns == (
        "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "arn:aws:kms:us-west-2:111122223333:key/0987dcba-09fe-87dc-65ba-ab0987654321",
    )
    # An alias is no Resource: its region, the stack's account and its name.
    assert scope.kms_aliases == (("us-west-2", ACCOUNT, "alias/pettracker-key"),)
    assert scope.ssm_parameters == ("/ami/pettracker-ml/{arch}/latest",)
    assert scope.build_instances == (
        BuildInstanceScope(None, (("Role", "pettracker-ml"),)),
        BuildInstanceScope(None, (("Role", "base-linux"), ("Stage", "build"))),
    )


def test_every_action_granted_exactly_once_per_rule(scope: Scope) -> None:
    statements = statements_for(EVERYTHING, scope)
    granted = {a for s in statements for a in s.actions}
    assert granted == set(EVERYTHING)
    for statement in statements:
        assert "*" not in "".join(statement.actions)


def test_read_only_actions_on_any_resource(scope: Scope) -> None:
    read = _by_sid(statements_for(EVERYTHING, scope))["ReadInventory"]
    assert read.resources == ("*",)
    assert set(read.actions) == {
        "autoscaling:DescribeAutoScalingGroups",
        "batch:DescribeComputeEnvironments",
        "ec2:DescribeImageReferences",
        "ec2:DescribeImages",
        "elasticmapreduce:ListClusters",
        "rbin:ListRules",
        "ssm:GetParameters",
    }
    assert not read.conditions


def test_mutating_image_actions(scope: Scope) -> None:
    s = _by_sid(statements_for(EVERYTHING, scope))
    image = "arn:aws:ec2:us-east-1::image/*"
    snapshot = "arn:aws:ec2:us-east-1::snapshot/*"
    assert s["RetireCandidates"] == Statement(
        "RetireCandidates",
        ("ec2:DeregisterImage", "ec2:DisableImage"),
        (image,),
        {"Null": {"aws:ResourceTag/ami-janitor:candidate-since": "false"}},
    )
    assert s["RestoreAndShareImages"].resources == (image,)
    # A rescue restores an owner's deprecation time whatever tags the AMI carries now.
    assert "ec2:EnableImageDeprecation" in s["RestoreAndShareImages"].actions
    assert not s["RestoreAndShareImages"].conditions
    assert s["TagJanitorKeys"] == Statement(
        "TagJanitorKeys",
        ("ec2:CreateTags", "ec2:DeleteTags"),
        (image, snapshot),
        {
            "ForAllValues:StringLike": {"aws:TagKeys": ["ami-janitor:*", "Current", "Latest"]},
            "Null": {"aws:TagKeys": "false"},
            # The opt-out tag is one of the janitor's keys by name: never written nor removed.
            "ForAllValues:StringNotEquals": {"aws:TagKeys": ["ami-janitor:keep"]},
        },
    )
    assert s["DeleteRetiredSnapshots"] == Statement(
        "DeleteRetiredSnapshots",
        ("ec2:DeleteSnapshot",),
        (snapshot,),
        {"Null": {"aws:ResourceTag/ami-janitor:retired-from": "false"}},
    )


def test_copies_and_bakes(scope: Scope) -> None:
    s = _by_sid(statements_for(EVERYTHING, scope))
    regions = ("us-east-1", "eu-west-1", "us-west-2")
    new = tuple(arn for r in regions for arn in (f"arn:aws:ec2:{r}::image/*", f"arn:aws:ec2:{r}::snapshot/*"))
    assert s["CopyImages"].resources == new
    assert s["TagOnCreate"] == Statement(
        "TagOnCreate",
        ("ec2:CreateTags",),
        new,
        {"StringEquals": {"ec2:CreateAction": ["CopyImage", "CreateImage"]}},
    )
    assert s["CreateImages"].resources == (
        "arn:aws:ec2:us-east-1::image/*",
        "arn:aws:ec2:us-east-1::snapshot/*",
    )
    instance = f"arn:aws:ec2:us-east-1:{ACCOUNT}:instance/*"
    assert s["CreateImagesFromInstances0"] == Statement(
        "CreateImagesFromInstances0",
        ("ec2:CreateImage",),
        (instance,),
        {"StringEquals": {"aws:ResourceTag/Role": "pettracker-ml"}},
    )
    assert s["CreateImagesFromInstances1"].conditions == {
        "StringEquals": {"aws:ResourceTag/Role": "base-linux", "aws:ResourceTag/Stage": "build"}
    }


def test_a_pinned_build_instance_is_the_only_one_a_bake_may_image(infra_policy: Any) -> None:
    families = [family.model_dump(exclude_unset=True) for family in infra_policy.families]
    families[0]["bake"]["instance_id"] = "i-0b0b0b0b0b0b0b0b0"  # with its tags
    families[1]["bake"] = {"instance_id": "i-0c0c0c0c0c0c0c0c0"}  # by id alone
    pinned = infra_policy.model_copy(update={"families": [Family.model_validate(f) for f in families]})
    scope = Scope.from_policy(pinned, partition="aws", account=ACCOUNT, region="us-east-1")

    s = _by_sid(statements_for(["ec2:CreateImage"], scope))

    instances = f"arn:aws:ec2:us-east-1:{ACCOUNT}:instance"
    assert s["CreateImagesFromInstances0"] == Statement(
        "CreateImagesFromInstances0",
        ("ec2:CreateImage",),
        (f"{instances}/i-0b0b0b0b0b0b0b0b0",),
        {"StringEquals": {"aws:ResourceTag/Role": "pettracker-ml"}},
    )
    assert s["CreateImagesFromInstances1"] == Statement(
        "CreateImagesFromInstances1", ("ec2:CreateImage",), (f"{instances}/i-0c0c0c0c0c0c0c0c0",), {}
    )


def _bakers(infra_policy: Any, bakes: list[dict[str, Any]]) -> Scope:
    """The test policy with one family per `bakes` entry (its bake), in us-east-1."""
    families = [
        {"name": f"f{n}", "match": {"name": f"f{n}-*", "tags": {"Family": f"f{n}"}}, "bake": bake}
        for n, bake in enumerate(bakes)
    ]
    policy = infra_policy.model_copy(update={"families": [Family.model_validate(f) for f in families]})
    return Scope.from_policy(policy, partition="aws", account=ACCOUNT, region="us-east-1")


def test_build_instances_told_apart_by_one_tag_share_a_statement(infra_policy: Any) -> None:
    """A statement per family filled the operator role's 10,240 characters at about 17 that bake: those
    matched by one tag of the same key list its values in one; those pinned by id alone, their ARNs."""
    instances = f"arn:aws:ec2:us-east-1:{ACCOUNT}:instance"
    scope = _bakers(
        infra_policy,
        [
            {"instance_tag": {"Role": "a"}},
            {"instance_tag": {"Role": "b"}},
            {"instance_id": "i-0a0a0a0a0a0a0a0a0"},
            {"instance_tag": {"Role": "c", "Stage": "build"}},
            {"instance_id": "i-0b0b0b0b0b0b0b0b0"},
            {"instance_tag": {"Team": "x"}},
        ],
    )

    s = _by_sid(statements_for(["ec2:CreateImage"], scope))

    grants = {sid: st for sid, st in s.items() if sid.startswith("CreateImagesFromInstances")}
    assert list(grants.values()) == [
        Statement(
            "CreateImagesFromInstances0",
            ("ec2:CreateImage",),
            (f"{instances}/*",),
            {"StringEquals": {"aws:ResourceTag/Role": ["a", "b"]}},
        ),
        Statement(
            "CreateImagesFromInstances1",
            ("ec2:CreateImage",),
            (f"{instances}/i-0a0a0a0a0a0a0a0a0", f"{instances}/i-0b0b0b0b0b0b0b0b0"),
            {},
        ),
        # Two keys: lists under each would let Role=c pair with another family's Stage. Its own.
        Statement(
            "CreateImagesFromInstances2",
            ("ec2:CreateImage",),
            (f"{instances}/*",),
            {"StringEquals": {"aws:ResourceTag/Role": "c", "aws:ResourceTag/Stage": "build"}},
        ),
        Statement(
            "CreateImagesFromInstances3",
            ("ec2:CreateImage",),
            (f"{instances}/*",),
            {"StringEquals": {"aws:ResourceTag/Team": "x"}},
        ),
    ]


def test_a_role_whose_inline_policy_iam_would_refuse_is_refused_at_synth(infra_policy: Any) -> None:
    many = _bakers(infra_policy, [{"instance_tag": {"Role": f"r{n}", "Stage": "build"}} for n in range(40)])
    statements = statements_for(["ec2:CreateImage", "ssm:SendCommand"], many)
    assert inline_characters(statements) > MAX_INLINE_CHARACTERS
    with pytest.raises(ValueError, match=r"the operator role: its permissions take .* over IAM's 10,240"):
        require_inline_fits(statements, "the operator role")
    one_key = _bakers(infra_policy, [{"instance_tag": {"Role": f"r{n}"}} for n in range(40)])
    require_inline_fits(statements_for(["ec2:CreateImage", "ssm:SendCommand"], one_key), "the operator role")


def test_without_copies_everything_stays_in_the_region(infra_policy: Any) -> None:
    own = Scope.from_policy(infra_policy, partition="aws", account=ACCOUNT, region="eu-west-1")
    for statement in statements_for(EVERYTHING, own):
        for arn in statement.resources:
            assert arn == "*" or arn.startswith("arn:aws:kms:") or ":eu-west-1:" in arn


def test_kms_only_on_key_arns_through_ec2(scope: Scope) -> None:
    s = _by_sid(statements_for(EVERYTHING, scope))
    kms = [st for st in s.values() if any(a.startswith("kms:") for a in st.actions)]
    assert {st.sid for st in kms} == {
        "DescribeReplicaKeys",
        "UseReplicaKeysThroughEc2",
        "GrantReplicaKeysToEc2",
        "DescribeReplicaKeysByAlias",
        "UseReplicaKeysThroughEc2ByAlias",
        "GrantReplicaKeysToEc2ByAlias",
    }
    for statement in kms:
        if statement.sid.endswith("ByAlias"):
            continue
        assert statement.resources == scope.kms_key_arns
    assert s["UseReplicaKeysThroughEc2"].conditions == {
        "StringLike": {"kms:ViaService": "ec2.*.amazonaws.com"}
    }
    assert s["GrantReplicaKeysToEc2"].conditions["Bool"] == {"kms:GrantIsForAWSResource": "true"}


def test_no_keys_or_parameters_means_no_statement(infra_policy: Any) -> None:
    bare = Scope(partition="aws", account=ACCOUNT, region="us-east-1")
    sids = {s.sid for s in statements_for(["kms:Decrypt", "ssm:PutParameter", "ec2:DescribeImages"], bare)}
    assert sids == {"ReadInventory"}


def test_latest_parameters_and_metrics(scope: Scope) -> None:
    s = _by_sid(statements_for(EVERYTHING, scope))
    assert s["WriteLatestParameters"].resources == (
        f"arn:aws:ssm:us-east-1:{ACCOUNT}:parameter/ami/pettracker-ml/*/latest",
    )
    assert s["PutJanitorMetrics"].conditions == {"StringEquals": {"cloudwatch:namespace": "AmiJanitor"}}


@pytest.mark.parametrize(
    ("actions", "message"),
    [
        (["ec2:*"], "not a wildcard"),
        (["kms:ReEncrypt*"], "not a wildcard"),
        (["*"], "not a wildcard"),
        (["DescribeImages"], "not an IAM action name"),
        (["ec2:RunInstances"], "no scoping rule for ec2:RunInstances"),
        (["kms:ScheduleKeyDeletion"], "no scoping rule"),
        (["secretsmanager:GetSecretValue"], "no scoping rule"),
        (["sqs:SendMessage"], "grants sqs actions on its own resources"),
    ],
)
def test_refused(scope: Scope, actions: list[str], message: str) -> None:
    with pytest.raises(PermissionsError, match=message.replace("*", r"\*")):
        statements_for(actions, scope)


def test_infra_actions_accepted_when_the_construct_provides_them(scope: Scope) -> None:
    statements = statements_for(
        ["sqs:SendMessage", "ec2:DescribeImages"], scope, provided=["sqs:SendMessage"]
    )
    assert [s.sid for s in statements] == ["ReadInventory"]  # granted by the construct, not twice


def test_statements_fit_the_service_authorization_reference(scope: Scope) -> None:
    reference = ServiceAuthorization()
    for statement in statements_for(EVERYTHING, scope):
        reference.check_statement(
            list(statement.actions), list(statement.resources), dict(statement.conditions)
        )


def test_an_alias_target_is_scoped_by_the_keys_aliases(scope: Scope) -> None:
    s = _by_sid(statements_for(EVERYTHING, scope))
    keys = (f"arn:aws:kms:us-west-2:{ACCOUNT}:key/*",)
    by_alias = {"ForAnyValue:StringEquals": {"kms:ResourceAliases": ["alias/pettracker-key"]}}
    via_ec2 = {"StringLike": {"kms:ViaService": "ec2.*.amazonaws.com"}}
    # DescribeKey resolves the alias (a direct call) and EC2 calls it while it copies: no ViaService.
    assert s["DescribeReplicaKeysByAlias"] == Statement(
        "DescribeReplicaKeysByAlias", ("kms:DescribeKey",), keys, by_alias
    )
    assert s["UseReplicaKeysThroughEc2ByAlias"] == Statement(
        "UseReplicaKeysThroughEc2ByAlias",
        ("kms:Decrypt", "kms:GenerateDataKeyWithoutPlaintext", "kms:ReEncryptFrom", "kms:ReEncryptTo"),
        keys,
        {**by_alias, **via_ec2},
    )
    assert s["GrantReplicaKeysToEc2ByAlias"] == Statement(
        "GrantReplicaKeysToEc2ByAlias",
        ("kms:CreateGrant",),
        keys,
        {**by_alias, **via_ec2, "Bool": {"kms:GrantIsForAWSResource": "true"}},
    )


def test_an_alias_arn_is_scoped_to_its_own_account(infra_policy: Any) -> None:
    families = [f.model_dump() for f in infra_policy.families]
    families[0]["replicate"] = [
        {"region": "eu-west-1", "kms_key_id": "arn:aws:kms:eu-west-1:444455556666:alias/shared/ami-key"}
    ]
    aliased = infra_policy.model_copy(update={"families": [Family.model_validate(f) for f in families]})
    scope = Scope.from_policy(aliased, partition="aws", account=ACCOUNT, region="us-east-1", copies=True)
    assert scope.kms_aliases == (("eu-west-1", "444455556666", "alias/shared/ami-key"),)
    s = _by_sid(statements_for(["kms:DescribeKey"], scope))
    assert s["DescribeReplicaKeysByAlias"].resources == ("arn:aws:kms:eu-west-1:444455556666:key/*",)
    assert s["DescribeReplicaKeysByAlias"].conditions == {
        "ForAnyValue:StringEquals": {"kms:ResourceAliases": ["alias/shared/ami-key"]}
    }


USAGE = ["s3:GetObject", "s3:ListBucket", "s3:PutObject"]


def test_usage_inbox_actions_without_an_inbox_are_dropped(scope: Scope) -> None:
    assert scope.usage_bucket == ""
    statements = statements_for([*USAGE, "ec2:DescribeImages"], scope)
    assert [s.sid for s in statements] == ["ReadInventory"]


def test_usage_inbox_a_report_written_under_the_accounts_own_prefix(infra_policy: Any) -> None:
    reporting = infra_policy.model_copy(
        update={"usage_reports": UsageReports(inbox="s3://ami-usage-inbox/janitor")}
    )
    scope = Scope.from_policy(reporting, partition="aws", account=ACCOUNT, region="us-east-1")
    assert (scope.usage_bucket, scope.usage_prefix) == ("ami-usage-inbox", "janitor/")

    # The construct's own s3:PutObject (the report bucket) does not stand for the inbox's.
    s = _by_sid(statements_for(USAGE, scope, provided=["s3:PutObject"]))

    reports = "arn:aws:s3:::ami-usage-inbox/janitor/reports/"
    assert s == {
        "PublishUsageReport": Statement("PublishUsageReport", ("s3:PutObject",), (f"{reports}{ACCOUNT}/*",)),
        "ReadUsageReports": Statement("ReadUsageReports", ("s3:GetObject",), (f"{reports}*",)),
        "ListUsageReports": Statement(
            "ListUsageReports", ("s3:ListBucket",), ("arn:aws:s3:::ami-usage-inbox",)
        ),
    }
    reference = ServiceAuthorization()
    for statement in s.values():
        reference.check_statement(
            list(statement.actions), list(statement.resources), dict(statement.conditions)
        )


def test_usage_inbox_reader_only_reads(infra_policy: Any) -> None:
    reporting = infra_policy.model_copy(update={"usage_reports": UsageReports(inbox="s3://ami-usage-inbox")})
    scope = Scope.from_policy(reporting, partition="aws", account=ACCOUNT, region="us-east-1")
    s = _by_sid(statements_for(["s3:GetObject", "s3:ListBucket"], scope))
    assert set(s) == {"ReadUsageReports", "ListUsageReports"}
    assert s["ReadUsageReports"].resources == ("arn:aws:s3:::ami-usage-inbox/reports/*",)
    # Unconditioned: S3 checks ListBucket for a GetObject of a missing key, with no prefix in context.
    assert s["ListUsageReports"].conditions == {}


def _tag_keys_allowed(statement: Statement, keys: list[str]) -> bool:
    """Whether a CreateTags/DeleteTags request naming `keys` meets the statement's aws:TagKeys condition
    (ForAllValues:StringLike: every requested key must match one of the patterns)."""
    import fnmatch

    patterns = statement.conditions.get("ForAllValues:StringLike", {}).get("aws:TagKeys", [])
    excluded = statement.conditions.get("ForAllValues:StringNotEquals", {}).get("aws:TagKeys", [])
    return all(
        any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns) and key not in excluded for key in keys
    )


def test_janitor_roles_may_not_remove_or_write_the_opt_out_tag(scope: Scope, infra_policy: Any) -> None:
    # The opt-out tag only ever makes the janitor keep more; no code path of the janitor writes or
    # removes it (aws/executor, rotator, sharer delete only janitor mirror tags and Latest tags).
    opt_out = infra_policy.defaults.opt_out_tag
    assert opt_out == "ami-janitor:keep"
    s = _by_sid(statements_for(["ec2:CreateTags", "ec2:DeleteTags"], scope))
    tagging = s["TagJanitorKeys"]
    assert set(tagging.actions) == {"ec2:CreateTags", "ec2:DeleteTags"}
    assert not _tag_keys_allowed(tagging, [opt_out]), (
        f"the janitor's roles may create and delete the opt-out tag {opt_out!r} on any AMI of the region: "
        f"{dict(tagging.conditions)}"
    )
    assert not _tag_keys_allowed(tagging, ["ami-janitor:candidate-since", opt_out])
    # What the janitor does write stays allowed.
    assert _tag_keys_allowed(tagging, ["ami-janitor:candidate-since", "Latest"])


def test_an_alias_grants_only_the_keys_of_its_own_target_region() -> None:
    # Two targets, each naming its key by an alias of its own: a key in eu-west-1 that carries only
    # us-west-2's alias is no target's key.
    two = Scope(
        partition="aws",
        account=ACCOUNT,
        region="us-east-1",
        kms_aliases=(("eu-west-1", ACCOUNT, "alias/eu-key"), ("us-west-2", ACCOUNT, "alias/us-key")),
    )
    wanted = {
        f"arn:aws:kms:eu-west-1:{ACCOUNT}:key/*": {"alias/eu-key"},
        f"arn:aws:kms:us-west-2:{ACCOUNT}:key/*": {"alias/us-key"},
    }
    for statement in statements_for(["kms:CreateGrant", "kms:Decrypt", "kms:DescribeKey"], two):
        aliases = set(statement.conditions["ForAnyValue:StringEquals"]["kms:ResourceAliases"])
        for key in statement.resources:
            assert aliases <= wanted[key], (
                f"{statement.sid}: {key} is granted when it carries any of {sorted(aliases)}, "
                f"but only {sorted(wanted[key])} names a key there"
            )
