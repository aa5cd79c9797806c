"""Policy validation: a bad file names the key path and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from ami_janitor.core.policy import PolicyError, load_policy, parse_policy
from builders import policy

REPO = Path(__file__).resolve().parents[2]
BASE = {"regions": ["us-east-1"], "families": [{"name": "a", "match": {"tags": {"P": "A"}}}]}


def error_of(data: object) -> str:
    with pytest.raises(PolicyError) as caught:
        parse_policy(data, source="janitor.yaml")
    return str(caught.value)


def with_family(**overrides: object) -> dict[str, object]:
    family = {"name": "b", "match": {"name": "b-*"}, **overrides}
    return {**BASE, "families": [BASE["families"][0], family]}  # type: ignore[index]


def test_example_policy_is_valid() -> None:
    loaded = load_policy(REPO / "janitor.yaml")
    assert loaded.mode == "dry-run"
    assert loaded.families[0].latest is not None


def test_defaults() -> None:
    loaded = parse_policy(BASE)
    assert loaded.mode == "dry-run"
    rules = loaded.rules_for(loaded.families[0])
    assert (rules.keep_latest, rules.min_age_days, rules.lifecycle.disable_after_days) == (3, 30, 7)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (with_family(keep_latest=0), "families[1].keep_latest: must be >= 1"),
        ({**BASE, "mode": "yolo"}, "mode: input should be 'dry-run', 'enforce' or 'paused'"),
        ({**BASE, "regions": ["us-east"]}, "regions: 'us-east' is not an AWS region name"),
        ({**BASE, "regions": []}, "regions: must not be empty"),
        (
            with_family(limits={"max_actions_per_run": 5}),
            "families[1].limits.max_actions_per_run: unknown key",
        ),
        (with_family(keep_lates=3), "families[1].keep_lates: unknown key"),
        (
            {**BASE, "defaults": {"limits": {"max_fraction_per_family": 2}}},
            "defaults.limits.max_fraction_per_family: must be <= 1",
        ),
        ({**BASE, "schedule": "every day"}, "schedule: must be an EventBridge expression"),
        (with_family(match={}), "families[1].match: give tags and/or a name glob"),
        (
            with_family(share_with={"accounts": ["12"]}),
            "families[1].share_with.accounts: '12' is not a 12-digit",
        ),
        (with_family(replicate=[{"region": "eu-west-1", "kms_key_id": "alias/x"}]), "must be a key ARN"),
        ({**BASE, "references": {"launch_template_versions": 0}}, "references.launch_template_versions"),
        ({**BASE, "families": [BASE["families"][0], BASE["families"][0]]}, "family 'a' is defined twice"),
        (
            with_family(lifecycle={"disable_after_days": 30, "deregister_after_days": 3}),
            "deregister_after_days (3) must be >= disable_after_days (30)",
        ),
        (
            {
                **BASE,
                "families": [{"name": "a", "match": {"tags": {"P": "A"}}, "latest": {"ssm_parameter": "x"}}],
            },
            "families[0].latest.ssm_parameter: must be a full parameter path",
        ),
        ("just text", "the policy must be a mapping"),
        (
            with_family(match={"name": "b-v*"}, bake={"instance_tag": {"Role": "b"}}),
            "families[1]: bake names images like b-20261125T030000Z, which match.name 'b-v*' does not select",
        ),
    ],
)
def test_errors_name_the_key_path(data: object, expected: str) -> None:
    message = error_of(data)
    assert message.startswith("janitor.yaml:")
    assert expected in message, message


def test_family_overrides_merge_into_defaults() -> None:
    loaded = policy(
        {
            "keep_latest": 5,
            "lifecycle": {"disable_after_days": 10},
            "limits": {"max_fraction_per_family": 0.2},
        }
    )
    rules = loaded.rules_for(loaded.families[0])
    assert rules.keep_latest == 5
    assert rules.lifecycle.disable_after_days == 10
    assert rules.lifecycle.deregister_after_days == 14  # inherited
    assert rules.limits.max_fraction_per_family == 0.2
    assert rules.limits.max_actions_per_run == 100


def test_managed_regions_include_replicate_targets() -> None:
    loaded = parse_policy(with_family(replicate=[{"region": "eu-west-1"}]))
    assert loaded.managed_regions == ["eu-west-1", "us-east-1"]


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        load_policy(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: [unclosed\n")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(bad)
    js = tmp_path / "p.json"
    js.write_text('{"regions": ["us-east-1"], "families": [{"name": "a", "match": {"name": "a-*"}}]}')
    assert load_policy(js).families[0].name == "a"


def test_ledger_defaults_and_errors() -> None:
    default = parse_policy(BASE)
    assert (default.ledger.table, default.ledger.retention_days) == ("ami-janitor-ledger", 90)
    named = parse_policy({**BASE, "ledger": {"table": "team.ledger-1", "retention_days": 30}})
    assert (named.ledger.table, named.ledger.retention_days) == ("team.ledger-1", 30)
    assert "ledger.retention_days: must be >= 1" in error_of({**BASE, "ledger": {"retention_days": 0}})
    assert "ledger.table:" in error_of({**BASE, "ledger": {"table": "no spaces"}})
    assert "ledger.tabel: unknown key" in error_of({**BASE, "ledger": {"tabel": "x"}})
