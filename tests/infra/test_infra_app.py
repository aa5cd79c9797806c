"""The app entry point: one stack per managed region, validated policy, clean validation report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aws_cdk import Stack
from synth_support import TEST_POLICY, Synth, cdk_context, run_app

from ami_janitor.core.policy import Policy, parse_policy

pytestmark = pytest.mark.slow  # synthesizes the stacks (or reads their synthesized templates)


def test_one_stack_per_managed_region(synth: Synth, infra_policy: Policy) -> None:
    # regions [us-east-1] plus the replicate targets eu-west-1 and us-west-2
    assert infra_policy.managed_regions == ["eu-west-1", "us-east-1", "us-west-2"]
    assert synth.stack_names() == [f"AmiJanitor-{r}" for r in infra_policy.managed_regions]
    artifacts = synth.manifest["artifacts"]
    for region in infra_policy.managed_regions:
        artifact = artifacts[f"AmiJanitor-{region}"]
        # No credentials at synth: the account stays a CloudFormation pseudo parameter.
        assert artifact["environment"] == f"aws://unknown-account/{region}"
        # The CloudFormation stack name is the artifact id unless given otherwise.
        assert artifact["properties"].get("stackName", f"AmiJanitor-{region}") == f"AmiJanitor-{region}"


def test_validation_report_is_clean(synth: Synth) -> None:
    """cdk-nag AwsSolutions and CDK's own template checks report nothing: no error, no warning."""
    report = json.loads((synth.outdir / "validation-report.json").read_text())
    assert report["pluginReports"] == [], json.dumps(report["pluginReports"], indent=2)
    assert "AwsSolutions" not in synth.stderr


def test_policy_shipped_as_json_in_each_asset(synth: Synth, infra_policy: Policy) -> None:
    for stack in synth.stack_names():
        asset = synth.code_asset_dir(stack)
        shipped = parse_policy(json.loads((asset / "policy.json").read_text()), source="policy.json")
        assert shipped == infra_policy
        # Inheritance from `defaults` survives the trip (a partial lifecycle override stays partial).
        for family in infra_policy.families:
            assert shipped.rules_for(shipped.family(family.name)) == infra_policy.rules_for(family)
        assert (asset / "ami_janitor" / "handlers" / "scheduled.py").is_file()


@pytest.mark.parametrize(
    ("old", "new", "says"),
    [
        ("{tag: Current}", "{tag: Current}\n    keep_latest: 0", "families[1].keep_latest: must be >= 1"),
        # A stack for a region that does not exist would fail at deploy, after the others were made.
        ("regions: [us-east-1]", "regions: [us-east-9]", "unknown region us-east-9 (did you mean us-east-"),
    ],
    ids=["key path", "unknown region"],
)
def test_bad_policy_fails_synth_naming_the_problem(tmp_path: Path, old: str, new: str, says: str) -> None:
    bad = tmp_path / "janitor.yaml"
    text = TEST_POLICY.read_text()
    assert old in text
    bad.write_text(text.replace(old, new))
    outdir = tmp_path / "out"
    result = run_app(bad, outdir)
    assert result.returncode == 2
    assert says in result.stderr
    assert str(bad) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (outdir / "manifest.json").exists()


def test_missing_policy_file_fails_synth(tmp_path: Path) -> None:
    result = run_app(tmp_path / "absent.yaml", tmp_path / "out")
    assert result.returncode == 2
    assert "cannot read the policy file" in result.stderr


@pytest.mark.parametrize("source", ["context", "environment"])
def test_account_from_context_or_environment(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from infra.stack import build_app

    # One region is enough here (and quicker to build than the three of the test policy).
    policy = parse_policy(
        {"regions": ["eu-west-1"], "families": [{"name": "base", "match": {"name": "base-*"}}]}
    )
    context = cdk_context()
    if source == "context":
        context["account"] = "111122223333"
        monkeypatch.delenv("CDK_DEFAULT_ACCOUNT", raising=False)
    else:
        monkeypatch.setenv("CDK_DEFAULT_ACCOUNT", "111122223333")
    app = build_app(policy, context=context, outdir=str(tmp_path), nag=False)
    stacks = [child for child in app.node.children if isinstance(child, Stack)]
    assert [(s.stack_name, s.region, s.account) for s in stacks] == [
        ("AmiJanitor-eu-west-1", "eu-west-1", "111122223333")
    ]
