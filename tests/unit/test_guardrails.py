"""Guardrails: the organization SCP the README offers for janitor tags (docs/scp-ami-janitor-tags.json),
and the plan's warning about families any tagger can enroll into."""

from __future__ import annotations

import json
from pathlib import Path

from ami_janitor.aws import ledger
from ami_janitor.core.guardrails import family_warnings
from ami_janitor.core.planner import plan
from ami_janitor.core.policy import JANITOR_TAG_PREFIX, parse_policy
from builders import NOW, inventory, policy

SCP = Path(__file__).resolve().parents[2] / "docs" / "scp-ami-janitor-tags.json"


def test_scp_denies_janitor_tag_writes_outside_the_janitor_path() -> None:
    document = json.loads(SCP.read_text(encoding="utf-8"))
    assert document["Version"] == "2012-10-17"
    [statement] = document["Statement"]
    assert statement["Effect"] == "Deny"
    assert sorted(statement["Action"]) == ["ec2:CreateTags", "ec2:DeleteTags"]
    assert statement["Resource"] == "*"
    condition = statement["Condition"]
    # Any key of the request like ami-janitor:* (ForAnyValue: one such key is enough).
    assert condition["ForAnyValue:StringLike"] == {"aws:TagKeys": [f"{JANITOR_TAG_PREFIX}*"]}
    # Every role the stacks make lives under the path the ledger's resource policy trusts as well.
    assert condition["ArnNotLike"] == {"aws:PrincipalArn": [ledger.janitor_principal_pattern("aws")]}
    assert ledger.janitor_principal_pattern("aws") == "arn:aws:iam::*:role/ami-janitor/*"
    # An SCP has no Principal element.
    assert "Principal" not in statement


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
    tags_alone = policy(regions=["us-east-1", "eu-west-1"])
    result = plan([inventory(region="us-east-1"), inventory(region="eu-west-1")], tags_alone, NOW)
    assert result.notes.count(TAGS_ALONE.format("app")) == 1

    with_a_glob = policy({"match": {"tags": {"Project": "App"}, "name": "app-*"}})
    assert not any("tags alone" in note for note in plan([inventory()], with_a_glob, NOW).notes)
