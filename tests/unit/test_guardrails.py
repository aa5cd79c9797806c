"""Guardrails: the organization SCP the README offers for janitor tags (docs/scp-ami-janitor-tags.json),
the plan's warning about families any tagger can enroll into, and about a usage inbox whose owner is
not checked."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import pytest

from ami_janitor.aws import ledger
from ami_janitor.core.guardrails import bake_warnings, brownout_warnings, family_warnings, inbox_warnings
from ami_janitor.core.planner import plan
from ami_janitor.core.policy import JANITOR_TAG_PREFIX, Rules, parse_policy
from builders import NOW, image, inventory, policy

SCP = Path(__file__).resolve().parents[2] / "docs" / "scp-ami-janitor-tags.json"


def test_scp_denies_janitor_tag_writes_outside_the_janitor_path() -> None:
    document = json.loads(SCP.read_text(encoding="utf-8"))
    assert document["Version"] == "2012-10-17"
    statement, every_tag = document["Statement"]
    # DeleteTags without keys removes every tag and sends no aws:TagKeys, which the first cannot see;
    # on AMIs and snapshots only (instances, volumes and the rest keep their owners' ways).
    assert every_tag == {
        "Sid": "NoDeleteOfEveryTagOfAnImage",
        "Effect": "Deny",
        "Action": ["ec2:DeleteTags"],
        "Resource": ["arn:*:ec2:*::image/*", "arn:*:ec2:*::snapshot/*"],
        "Condition": {
            "Null": {"aws:TagKeys": "true"},
            "ArnNotLike": {"aws:PrincipalArn": [ledger.janitor_principal_pattern("aws")]},
        },
    }
    assert statement["Effect"] == "Deny"
    assert sorted(statement["Action"]) == ["ec2:CreateTags", "ec2:DeleteTags"]
    assert statement["Resource"] == "*"
    condition = statement["Condition"]
    # Any key of the request like ami-janitor:* (ForAnyValue: one such key is enough).
    assert condition["ForAnyValue:StringLike"] == {"aws:TagKeys": [f"{JANITOR_TAG_PREFIX}*"]}
    # ...other than the default opt-out key: it can only keep an AMI, and anyone may be let write it.
    assert condition["ForAnyValue:StringNotEquals"] == {"aws:TagKeys": [Rules().opt_out_tag]}
    # Every role the stacks make lives under the path the ledger's resource policy trusts as well.
    assert condition["ArnNotLike"] == {"aws:PrincipalArn": [ledger.janitor_principal_pattern("aws")]}
    assert ledger.janitor_principal_pattern("aws") == "arn:aws:iam::*:role/ami-janitor/*"
    # An SCP has no Principal element.
    assert "Principal" not in statement


def scp_denies(action: str, principal: str, tag_keys: list[str] | None) -> bool:
    """The SCP's answer to a request, by IAM's rules for the operators it uses (`tag_keys` None: the
    request names no key, as a DeleteTags of every tag)."""
    context: dict[str, Any] = {"aws:TagKeys": tag_keys, "aws:PrincipalArn": principal}
    held = {
        # Null "true": the request has no such key.
        "Null": lambda got, wanted: (got is None) == (wanted == "true"),
        # ForAnyValue: some value of the request matches some value of the policy (none: false).
        "ForAnyValue:StringLike": lambda got, wanted: any(
            fnmatch.fnmatchcase(v, w) for v in got or () for w in wanted
        ),
        # A negated operator: some value of the request equals none of the policy's.
        "ForAnyValue:StringNotEquals": lambda got, wanted: any(v not in wanted for v in got or ()),
        "ArnNotLike": lambda got, wanted: not any(fnmatch.fnmatchcase(got, w) for w in wanted),
    }
    document = json.loads(SCP.read_text(encoding="utf-8"))
    return any(
        statement["Effect"] == "Deny"
        and action in statement["Action"]
        and all(
            held[operator](context[key], wanted)
            for operator, keys in statement["Condition"].items()
            for key, wanted in keys.items()
        )
        for statement in document["Statement"]
    )


SOMEONE = "arn:aws:iam::111122223333:role/platform-builds"
JANITOR = "arn:aws:iam::111122223333:role/ami-janitor/ami-janitor-scheduled"


@pytest.mark.parametrize("action", ["ec2:CreateTags", "ec2:DeleteTags"])
def test_under_the_scp_anyone_may_write_the_opt_out_tag_and_only_the_janitor_its_own(action: str) -> None:
    keep = Rules().opt_out_tag
    assert not scp_denies(action, SOMEONE, [keep])  # an owner opts an AMI out, or back in
    assert not scp_denies(action, SOMEONE, ["Name", "Project"])
    assert scp_denies(action, SOMEONE, ["ami-janitor:candidate-since"])
    assert scp_denies(action, SOMEONE, [keep, "ami-janitor:shared"])
    # The opt-out tag goes in a request of its own: with another key, the SCP cannot tell them apart.
    assert scp_denies(action, SOMEONE, [keep, "Name"])
    assert not scp_denies(action, JANITOR, ["ami-janitor:candidate-since", keep])


def test_under_the_scp_only_the_janitor_may_delete_every_tag_of_a_resource() -> None:
    """DeleteTags without keys removes every tag, the janitor's too, and sends no aws:TagKeys."""
    assert scp_denies("ec2:DeleteTags", SOMEONE, None)
    assert not scp_denies("ec2:CreateTags", SOMEONE, None)  # CreateTags always names its keys
    assert not scp_denies("ec2:DeleteTags", JANITOR, None)


TAGS_ALONE = "family {} is matched by tags alone: anyone who may tag an AMI can enroll it (add a name glob)"


def test_a_family_matched_by_tags_alone_is_warned() -> None:
    loaded = parse_policy(
        {
            "regions": ["us-east-1"],
            "families": [
                {"name": "web", "match": {"tags": {"Project": "Web"}}},
                {"name": "api", "match": {"tags": {"Project": "Api"}, "name": "api-*"}},
                {"name": "ml", "match": {"name": "ml-*"}},
                {"name": "db", "match": {"tags": {"Project": "Db", "Team": "Data"}}},
            ],
        }
    )
    assert family_warnings(loaded) == [TAGS_ALONE.format("web"), TAGS_ALONE.format("db")]


def test_the_warning_is_a_plan_note_once_whatever_the_regions() -> None:
    tags_alone = policy({"match": {"tags": {"Project": "App"}}}, regions=["us-east-1", "eu-west-1"])
    result = plan([inventory(region="us-east-1"), inventory(region="eu-west-1")], tags_alone, NOW)
    assert result.notes.count(TAGS_ALONE.format("app")) == 1

    with_a_glob = policy({"match": {"tags": {"Project": "App"}, "name": "app-*"}})
    assert not any("tags alone" in note for note in plan([inventory()], with_a_glob, NOW).notes)


def test_amis_a_familys_name_glob_names_but_its_tags_leave_out_are_named_in_the_plan() -> None:
    """A name glob closes a family to the AMIs it names: those of them its tags leave out, and no family
    selects, a tagger can enroll (they would count among its newest, and be shared where it shares)."""
    sharing = policy(
        {
            "match": {"tags": {"Project": "App"}, "name": "app-*"},
            "share_with": {"accounts": ["111122223333"]},
        },
        regions=["us-east-1", "eu-west-1"],
    )
    member = image(name="app-1", tags={"Project": "App"})
    scratch = [image(name=f"app-scratch-{n}", tags={"Project": "Scratch"}) for n in range(7)]
    other_team = image(name="app-2", tags={"Project": "Other"})
    unrelated = image(name="base", tags={})
    result = plan(
        [
            inventory(member, *scratch, other_team, unrelated),
            inventory(member.model_copy(update={"region": "eu-west-1"}), region="eu-west-1"),
        ],
        sharing,
        NOW,
    )
    outside = sorted(i.image_id for i in [*scratch, other_team])
    [note] = [n for n in result.notes if "lack its tags" in n]
    assert note == (
        f"us-east-1: family app: 8 AMI(s) its name glob app-* names lack its tags ({', '.join(outside[:5])} "
        "and 3 more): anyone who may tag them can enroll them and have them shared (narrow the name glob)"
    )
    # Where the glob names only the family's own AMIs, or the family has no tags to forge, no note.
    assert not any("lack its tags" in n for n in plan([inventory(member, unrelated)], sharing, NOW).notes)
    by_name = policy({"match": {"name": "app-*"}})
    assert not any("lack its tags" in n for n in plan([inventory(member, *scratch)], by_name, NOW).notes)


UNCHECKED_INBOX = (
    "the usage inbox's owner is not checked: whoever owns the bucket usage-inbox can forge the usage "
    "reports read and receives those written (set usage_reports.inbox_account)"
)


def test_usage_reports_without_the_inbox_account_are_warned_once_in_the_plan() -> None:
    base = {"regions": ["us-east-1", "eu-west-1"], "families": [{"name": "app", "match": {"name": "app-*"}}]}
    unchecked = parse_policy({**base, "usage_reports": {"inbox": "s3://usage-inbox/org"}})
    checked = parse_policy(
        {**base, "usage_reports": {"inbox": "s3://usage-inbox/org", "inbox_account": "111122223333"}}
    )
    assert inbox_warnings(unchecked) == [UNCHECKED_INBOX]
    assert inbox_warnings(checked) == inbox_warnings(parse_policy(base)) == []

    inventories = [inventory(region="us-east-1"), inventory(region="eu-west-1")]
    assert plan(inventories, unchecked, NOW).notes.count(UNCHECKED_INBOX) == 1
    assert not any("inbox" in note for note in plan(inventories, checked, NOW).notes)


def test_sharing_families_whose_brownout_is_shorter_than_a_reports_freshness_are_warned() -> None:
    """A report written just before an account was granted an AMI does not name it, yet counts while
    fresh: only the disable stage's brownout, lasting at least max_age_hours, covers that window."""
    shares = {"share_with": {"accounts": ["222222222222"]}}

    def family(name: str, lifecycle: dict[str, int | None], share: bool = True) -> dict[str, object]:
        return {
            "name": name,
            "match": {"name": f"{name}-*"},
            "lifecycle": lifecycle,
            **(shares if share else {}),
        }

    families = [
        family("web", {}),  # the defaults: disable at 7 days, deregister at 14
        family("api", {"disable_after_days": None}),
        family("batch", {"disable_after_days": 13, "deregister_after_days": 14}),
        family("solo", {"disable_after_days": None}, share=False),  # shared with nobody by the policy
        {**family("byhand", {"disable_after_days": None}, share=False), "allow_shared": True},
        family("kept", {"disable_after_days": None, "deregister_after_days": None}),  # never deregistered
    ]
    base = {"regions": ["us-east-1"], "families": families}
    reporting = parse_policy({**base, "usage_reports": {"inbox": "s3://usage-inbox/org"}})

    [note] = brownout_warnings(reporting)

    assert note == (
        "families that deregister sooner after the disable stage than usage_reports.max_age_hours (48): "
        "api (no disable stage), batch (24 hours), byhand (no disable stage). A usage report written before an account was granted "
        "an AMI does not name it, yet counts while fresh: keep disable_after_days at least 2 day(s) before "
        "deregister_after_days where shares change"
    )
    assert plan([inventory()], reporting, NOW).notes.count(note) == 1
    # A day's freshness is covered by batch's day of brownout; without usage reports, nothing to say.
    daily = parse_policy({**base, "usage_reports": {"inbox": "s3://usage-inbox/org", "max_age_hours": 24}})
    assert [n.split(". ")[0] for n in brownout_warnings(daily)] == [
        "families that deregister sooner after the disable stage than usage_reports.max_age_hours (24): "
        "api (no disable stage), byhand (no disable stage)"
    ]
    assert brownout_warnings(parse_policy(base)) == []


def test_a_family_that_bakes_by_tag_alone_and_hands_on_what_it_bakes_is_warned() -> None:
    """Whoever may tag instances can take a build instance's tag off and put it on an instance of their
    own, which the bake then images under the family's name and tags: where the family shares, makes
    public or makes Latest what it bakes, the plan says so (once, whatever the regions). A pinned
    instance, or a family that hands nothing on, is not warned."""
    bake = {"instance_tag": {"Role": "ml", "Env": "prod"}}
    loaded = parse_policy(
        {
            "regions": ["us-east-1", "eu-west-1"],
            "families": [
                {
                    "name": "shared",
                    "match": {"name": "shared-*"},
                    "bake": bake,
                    "share_with": {"accounts": ["111111111111"]},
                },
                {"name": "latest", "match": {"name": "latest-*"}, "bake": bake, "latest": {"tag": "Latest"}},
                {
                    "name": "pinned",
                    "match": {"name": "pinned-*"},
                    "bake": {**bake, "instance_id": "i-0123456789abcdef0", "regions": ["us-east-1"]},
                    "latest": {"tag": "Latest"},
                },
                {"name": "kept", "match": {"name": "kept-*"}, "bake": bake},
            ],
        }
    )
    warned = (
        "family {} bakes the only live instance tagged Env=prod, Role=ml and {} what it bakes: anyone who "
        "may tag instances can choose that instance (pin bake.instance_id)"
    )
    assert bake_warnings(loaded) == [
        warned.format("shared", "shares"),
        warned.format("latest", "makes Latest"),
    ]
    notes = plan([inventory(region="us-east-1"), inventory(region="eu-west-1")], loaded, NOW).notes
    assert [note for note in notes if "bakes the only live instance" in note] == bake_warnings(loaded)
