"""docs/scp-ami-janitor-tags.json: the organization guardrail the README offers for janitor tags."""

from __future__ import annotations

import json
from pathlib import Path

from ami_janitor.aws import ledger
from ami_janitor.core.policy import JANITOR_TAG_PREFIX

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
