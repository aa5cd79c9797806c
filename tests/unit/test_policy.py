"""Policy validation: a bad file names the key path and the reason."""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from ami_janitor.core.policy import Policy, PolicyError, load_policy, parse_policy
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
            "families[1].limits: max_actions_per_run is a budget of each region's run, shared by its families",
        ),
        (with_family(keep_lates=3), "families[1].keep_lates: unknown key"),
        (
            {**BASE, "defaults": {"limits": {"max_fraction_per_family": 2}}},
            "defaults.limits.max_fraction_per_family: must be <= 1",
        ),
        ({**BASE, "schedule": "every day"}, "schedule: must be an EventBridge expression"),
        # What EventBridge itself refuses: refused here, not at deploy.
        ({**BASE, "schedule": "cron(0 2 * * * *)"}, "exactly one of day-of-month and day-of-week must be ?"),
        ({**BASE, "schedule": "cron(0 2 ? * ? *)"}, "exactly one of day-of-month and day-of-week must be ?"),
        (
            with_family(bake={"instance_tag": {"Role": "build"}, "schedule": "cron(0 2 ? * ? *)"}),
            "families[1].bake.schedule: cron(0 2 ? * ? *): exactly one of",
        ),
        ({**BASE, "schedule": "rate(1 minutes)"}, "EventBridge writes it rate(1 minute)"),
        ({**BASE, "schedule": "rate(5 minute)"}, "EventBridge writes it rate(5 minutes)"),
        ({**BASE, "schedule": "rate(0 days)"}, "a rate is at least 1"),
        (with_family(match={}), "families[1].match: give tags and/or a name glob"),
        (
            with_family(share_with={"accounts": ["12"]}),
            "families[1].share_with.accounts: '12' is not a 12-digit",
        ),
        ({**BASE, "references": {"launch_template_versions": 0}}, "references.launch_template_versions"),
        (
            {**BASE, "usage_reports": {"inbox": "s3://usage-inbox", "max_age_hours": 0}},
            "usage_reports.max_age_hours: must be >= 1",
        ),
        # A bound past the inbox's retention, or past what a datetime can subtract, is refused here.
        (
            {**BASE, "usage_reports": {"inbox": "s3://usage-inbox", "max_age_hours": 100_000_000}},
            "usage_reports.max_age_hours: must be <= 720",
        ),
        (
            {**BASE, "usage_reports": {"inbox": "s3://usage-inbox", "inbox_account": "1234"}},
            "usage_reports.inbox_account: '1234' is not a 12-digit account id",
        ),
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
        *(
            (
                {
                    **BASE,
                    "families": [
                        {"name": "a", "match": {"tags": {"P": "A"}}, "latest": {"ssm_parameter": name}}
                    ],
                },
                f"families[0].latest.ssm_parameter: {says}",
            )
            for name, says in [
                ("/ami/web/{arch}/lat est", "SSM allows only letters, digits"),
                ("/ami/web:latest", "SSM allows only letters, digits"),
                ("/aws/web/{arch}/latest", "a parameter name may not begin with 'aws' or 'ssm'"),
                ("/SSM-images/latest", "a parameter name may not begin with 'aws' or 'ssm'"),
                ("/a" * 16, "SSM allows at most 15 levels"),
                ("/" + "a" * 1011, "SSM allows at most 15 levels and 1011 characters"),
            ]
        ),
        (
            with_family(match={"name": "pettracker-{ml,x}-*"}),
            "families[1].match: name glob 'pettracker-{ml,x}-*' names no AMI: an AMI's name is 3 to "
            "128 letters, digits, spaces and ( ) [ ] . / - ' @ _ (fnmatch has no {a,b}",
        ),
        (with_family(match={"name": "b:*"}), "name glob 'b:*' names no AMI"),
        (with_family(match={"name": "b-[z-a]*", "tags": {"P": "B"}}), "name glob 'b-[z-a]*' names no AMI"),
        (
            {**BASE, "defaults": {"limits": {"max_fraction_per_family": float("nan")}}},
            "defaults.limits.max_fraction_per_family: input should be a finite number",
        ),
        ("just text", "the policy must be a mapping"),
        (
            with_family(match={"name": "b-v*"}, bake={"instance_tag": {"Role": "b"}}),
            "families[1]: bake names images like b-20261125T030000Z, which match.name 'b-v*' does not select",
        ),
        (
            # Selects this year's bakes only: from 2027 on, none would be rotated, shared or retired.
            with_family(match={"name": "b-2026*"}, bake={"instance_tag": {"Role": "b"}}),
            "families[1]: bake names images b-<UTC timestamp> (like b-20261125T030000Z), and match.name "
            "'b-2026*' does not select all of them (b-00000000T000000Z, for one)",
        ),
        (
            with_family(match={"name": "b-*T03*"}, bake={"instance_tag": {"Role": "b"}}),
            "match.name 'b-*T03*' does not select all of them",
        ),
    ],
)
def test_errors_name_the_key_path(data: object, expected: str) -> None:
    message = error_of(data)
    assert message.startswith("janitor.yaml:")
    assert expected in message, message


# Python's `$` also matches before a last newline, and `\d` any Unicode digit: a value with either
# passed a check written so (a block scalar in YAML ends its text with a newline).
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({**BASE, "regions": ["us-east-1\n"]}, "regions: 'us-east-1\\n' is not an AWS region name"),
        (with_family(share_with={"accounts": ["123456789012\n"]}), "families[1].share_with.accounts:"),
        (with_family(share_with={"accounts": ["\u0661" * 12]}), "is not a 12-digit"),
        (
            {**BASE, "usage_reports": {"inbox": "s3://usage-inbox", "inbox_account": "123456789012\n"}},
            "usage_reports.inbox_account:",
        ),
        (
            {**BASE, "usage_reports": {"inbox": "s3://usage-inbox\n"}},
            "usage_reports.inbox: string should match",
        ),
        ({**BASE, "ledger": {"table": "ami-janitor-ledger\n"}}, "ledger.table: string should match pattern"),
        (with_family(name="b\n"), "families[1].name: string should match pattern"),
        ({**BASE, "notify": {"email": "ops@example.com\n"}}, "notify.email: string should match pattern"),
        ({**BASE, "schedule": "rate(5 minutes)\n"}, "schedule: must be an EventBridge expression"),
        ({**BASE, "schedule": "rate(\u0665 minutes)"}, "schedule: must be an EventBridge expression"),
        (
            with_family(replicate=[{"region": "eu-west-1", "kms_key_id": "alias/pettracker-key\n"}]),
            "is not a KMS key ARN",
        ),
        (
            with_family(bake={"instance_id": "i-0123456789abcdef0\n"}, match={"name": "b-*"}),
            "families[1].bake.instance_id: string should match pattern",
        ),
    ],
)
def test_a_value_ending_in_a_newline_or_with_other_digits_is_refused(data: object, expected: str) -> None:
    message = error_of(data)
    assert expected in message, message


KEY_EU = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


@pytest.mark.parametrize(
    ("kms_key_id", "alias"),
    [
        (KEY_EU, None),
        ("arn:aws:kms:eu-west-1:111122223333:key/mrk-1234abcd12ab34cd56ef1234567890ab", None),
        ("arn:aws-us-gov:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab", None),
        ("alias/pettracker-key", "alias/pettracker-key"),
        ("alias/team/pettracker_key-2", "alias/team/pettracker_key-2"),
        ("arn:aws:kms:eu-west-1:111122223333:alias/pettracker-key", "alias/pettracker-key"),
        (None, None),
    ],
)
def test_kms_key_id_accepts_a_key_arn_an_alias_or_an_alias_arn(
    kms_key_id: str | None, alias: str | None
) -> None:
    loaded = parse_policy(with_family(replicate=[{"region": "eu-west-1", "kms_key_id": kms_key_id}]))
    target = loaded.family("b").replicate[0]
    assert target.kms_key_id == kms_key_id
    assert target.kms_alias == alias


@pytest.mark.parametrize(
    ("kms_key_id", "expected"),
    [
        ("1234abcd-12ab-34cd-56ef-1234567890ab", "is not a KMS key ARN"),  # a bare key id
        ("pettracker-key", "is not a KMS key ARN"),
        ("alias/", "is not a KMS key ARN"),
        ("alias/aws/ebs", "is not a KMS key ARN"),  # AWS managed: not a customer key
        ("alias/pet tracker", "is not a KMS key ARN"),
        ("arn:aws:kms:eu-west-1:111122223333:key/", "is not a KMS key ARN"),
        ("arn:aws:kms:eu-west-1:1111:key/1234abcd", "is not a KMS key ARN"),
        ("arn:aws:s3:::bucket", "is not a KMS key ARN"),
        ("arn:aws:kms:eu-west-1:111122223333:alias/", "is not a KMS key ARN"),
        (
            "arn:aws:kms:us-east-1:111122223333:alias/pettracker-key",
            "arn:aws:kms:us-east-1:111122223333:alias/pettracker-key is in us-east-1, not in the target "
            "region eu-west-1",
        ),
        (
            "arn:aws:kms:us-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "is in us-west-2, not in the target region eu-west-1",
        ),
        ("", "is not a KMS key ARN"),
    ],
)
def test_kms_key_id_refusals_name_the_field(kms_key_id: str, expected: str) -> None:
    message = error_of(with_family(replicate=[{"region": "eu-west-1", "kms_key_id": kms_key_id}]))
    assert "families[1].replicate[0]" in message and "kms_key_id" in message, message
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


def test_a_missing_default_policy_file_says_how_to_name_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AMI_JANITOR_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PolicyError) as raised:
        load_policy()
    assert str(raised.value) == (
        f"no policy file janitor.yaml in {tmp_path}: pass --config FILE or set AMI_JANITOR_CONFIG"
    )


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


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({**BASE, "defaults": {"keep_latest": True}}, "defaults.keep_latest"),
        ({**BASE, "defaults": {"min_age_days": "30"}}, "defaults.min_age_days"),
        (
            {**BASE, "defaults": {"lifecycle": {"disable_after_days": 7.5}}},
            "defaults.lifecycle.disable_after_days",
        ),
        ({**BASE, "defaults": {"allow_shared": "yes"}}, "defaults.allow_shared"),
        (with_family(public=1), "families[1].public"),
        (with_family(keep_latest=False), "families[1].keep_latest"),
        # `yes` is not 1.0: the cap would be off.
        (
            {**BASE, "defaults": {"limits": {"max_fraction_per_family": True}}},
            "defaults.limits.max_fraction_per_family",
        ),
        (
            with_family(limits={"max_fraction_per_family": "0.5"}),
            "families[1].limits.max_fraction_per_family",
        ),
        # `yes` is not 1: fewer template versions would count as references.
        ({**BASE, "references": {"launch_template_versions": True}}, "references.launch_template_versions"),
        ({**BASE, "references": {"launch_template_versions": "3"}}, "references.launch_template_versions"),
        ({**BASE, "references": {"launch_template_versions": 2.0}}, "references.launch_template_versions"),
    ],
)
def test_numbers_and_switches_must_be_what_they_say(data: object, expected: str) -> None:
    # `keep_latest: true` is not 1: a value of the wrong kind is refused, not converted.
    assert f"{expected}: " in error_of(data)


def test_a_fraction_may_be_written_as_an_integer() -> None:
    for written in (0, 1):
        loaded = parse_policy({**BASE, "defaults": {"limits": {"max_fraction_per_family": written}}})
        assert loaded.defaults.limits.max_fraction_per_family == float(written)
    loaded = parse_policy({**BASE, "references": {"launch_template_versions": 3}})
    assert loaded.references.launch_template_versions == 3


def test_a_pinned_build_instance_bakes_in_the_one_region_it_lives_in() -> None:
    pinned = {"instance_id": "i-0b0b0b0b", "schedule": "rate(1 day)"}
    two = {**BASE, "regions": ["us-east-1", "eu-west-1"]}
    family = {"name": "app", "match": {"name": "app-*"}}

    # An instance lives in one region: a scheduled bake of it everywhere would fail daily elsewhere.
    assert (
        "families[0].bake.instance_id: i-0b0b0b0b is an instance of one region, and family app bakes in "
        "us-east-1, eu-west-1: set bake.regions to the region it lives in"
    ) in error_of({**two, "families": [{**family, "bake": pinned}]})
    loaded = parse_policy({**two, "families": [{**family, "bake": {**pinned, "regions": ["eu-west-1"]}}]})
    assert loaded.bake_regions(loaded.families[0]) == ["eu-west-1"]
    # One policy region: that is where it lives.
    alone = parse_policy({**BASE, "families": [{**family, "bake": pinned}]})
    assert alone.bake_regions(alone.families[0]) == BASE["regions"]
    # Tagged build instances may live in several regions: by default the bake runs in each.
    tagged = parse_policy({**two, "families": [{**family, "bake": {"instance_tag": {"Role": "b"}}}]})
    assert tagged.bake_regions(tagged.families[0]) == ["us-east-1", "eu-west-1"]


@pytest.mark.parametrize(
    "match",
    [
        {"tags": {"P": "A"}},
        {"tags": {"P": "A"}, "name": "*"},
        # No AMI name holds a `~`: these name any AMI as `*` does.
        {"tags": {"P": "A"}, "name": "[!~]*"},
        {"tags": {"P": "A"}, "name": "*[ -~]"},
    ],
)
@pytest.mark.parametrize(
    ("sharing", "what"),
    [({"share_with": {"accounts": ["123456789012"]}}, "share_with"), ({"public": True}, "public: true")],
)
def test_a_family_that_shares_needs_a_name_glob(
    match: dict[str, Any], sharing: dict[str, Any], what: str
) -> None:
    """Matched by tags alone, any AMI a tag-writer enrolls would be shared: a tag never widens a grant."""
    data = {**BASE, "families": [{"name": "a", "match": match, **sharing}]}
    assert (
        f"families[0]: {what} needs a match.name glob that names the family's images: matched by tags "
        "alone, anyone who may tag an AMI could enroll it and have it shared"
    ) in error_of(data)
    named = {"name": "a", "match": {**match, "name": "a-*"}, **sharing}
    assert parse_policy({**BASE, "families": [named]}).families[0].match.name == "a-*"


@pytest.mark.parametrize(
    ("internal", "partner"),
    [
        (
            {"name": "svc-*", "tags": {"Audience": "internal"}},
            {"name": "svc-*", "tags": {"Audience": "partner"}},
        ),
        ({"name": "svc-[a-z]*", "tags": {"T": "1"}}, {"name": "*-partner", "tags": {"T": "2"}}),
    ],
)
def test_families_told_apart_by_tags_alone_share_alike(
    internal: dict[str, Any], partner: dict[str, Any]
) -> None:
    """Only tags tell the two families' AMIs apart: a tag-writer could move one from the first to the
    second (and back), granting (revoking) the second's launch permissions."""
    sharing = {"share_with": {"accounts": ["123456789012"]}, "public": True}
    families = [{"name": "internal", "match": internal}, {"name": "partner", "match": partner, **sharing}]
    assert (
        "families 'partner' and 'internal' share differently, and only their tags tell their AMIs apart"
    ) in error_of({**BASE, "families": families})
    alike = [{**families[0], **sharing}, families[1]]  # shared alike: nothing for a tag to grant or revoke
    assert len(parse_policy({**BASE, "families": alike}).families) == 2


@pytest.mark.parametrize(
    "internal",
    [
        {"name": "svc-internal-*", "tags": {"Audience": "internal"}},  # names no AMI can have both of
        {"name": "svc-*"},  # by its name alone: a tag can only make an AMI match both (then it is kept)
        {"tags": {"Cleanup": "yes"}},  # matched by tags alone: left out of the check (README, "Trust")
    ],
)
def test_families_told_apart_by_name_may_share_differently(internal: dict[str, Any]) -> None:
    partner = {"name": "svc-partner-*", "tags": {"Audience": "partner"}}
    if internal.get("name") != "svc-internal-*":
        partner = {"name": "svc-*", "tags": {"Audience": "partner"}}
    families = [
        {"name": "internal", "match": internal},
        {"name": "partner", "match": partner, "share_with": {"accounts": ["123456789012"]}},
    ]
    assert len(parse_policy({**BASE, "families": families}).families) == 2


def test_bake_regions_are_regions_of_the_policy() -> None:
    family = {"name": "app", "match": {"name": "app-*"}}
    outside = {"instance_tag": {"Role": "b"}, "regions": ["us-east-1", "ap-south-1"]}
    assert (
        "families[0].bake.regions: ap-south-1 not in regions (us-east-1): builds are baked where the "
        "policy manages sources"
    ) in error_of({**BASE, "regions": ["us-east-1"], "families": [{**family, "bake": outside}]})
    twice = {"instance_tag": {"Role": "b"}, "regions": ["us-east-1", "us-east-1"]}
    assert "a region is named twice" in error_of({**BASE, "families": [{**family, "bake": twice}]})
    bad = {"instance_tag": {"Role": "b"}, "regions": ["useast1"]}
    assert "'useast1' is not an AWS region name" in error_of({**BASE, "families": [{**family, "bake": bad}]})


# Every model of the policy file, each optional one present, each optional value set: the walk below
# reaches every field through it.
EVERY_FIELD: dict[str, Any] = {
    "mode": "dry-run",
    "regions": ["us-east-1"],
    "schedule": "rate(1 day)",
    "notify": {"email": "ops@example.com"},
    "ledger": {"table": "ami-janitor-ledger", "retention_days": 90},
    "references": {"launch_template_versions": "all"},
    "defaults": {
        "keep_latest": 3,
        "min_age_days": 30,
        "launched_within_days": 14,
        "opt_out_tag": "ami-janitor:keep",
        "allow_shared": False,
        "lifecycle": {"deprecate_after_days": 0, "disable_after_days": 7, "deregister_after_days": 14},
        "limits": {"max_actions_per_run": 50, "max_fraction_per_family": 0.5},
    },
    "families": [
        {
            "name": "web",
            "match": {"tags": {"Project": "Web"}, "name": "web-*"},
            "latest": {"tag": "Latest", "ssm_parameter": "/ami/web/{arch}"},
            "replicate": [{"region": "eu-west-1", "kms_key_id": "alias/web"}],
            "share_with": {
                "accounts": ["123456789012"],
                "organizations": ["arn:aws:organizations::123456789012:organization/o-abcdefghij"],
                "organizational_units": [
                    "arn:aws:organizations::123456789012:ou/o-abcdefghij/ou-ab12-abcdefgh"
                ],
            },
            "public": False,
            "bake": {
                "instance_id": "i-0123456789abcdef0",
                "instance_tag": {"Role": "web"},
                "schedule": "rate(1 day)",
                "no_reboot": False,
                "regions": ["us-east-1"],
            },
            "keep_latest": 2,
            "min_age_days": 7,
            "launched_within_days": 7,
            "opt_out_tag": "keep",
            "allow_shared": True,
            "lifecycle": {"deprecate_after_days": 1, "disable_after_days": 2, "deregister_after_days": 3},
            "limits": {"max_fraction_per_family": 0.25},
        }
    ],
    "usage_reports": {
        "inbox": "s3://usage-inbox/janitor",
        "max_age_hours": 48,
        "required": True,
        "inbox_account": "111122223333",
    },
    "organization": {
        "id": "o-abcdefghij",
        "deploy_to": ["ou-ab12-abcdefgh"],
        "code_bucket_prefix": "ami-janitor-code",
    },
}

# Values of each kind, to put where a field does not take that kind (an int is a float).
WRONG_KINDS: list[object] = [True, 1, 2.0, "0", "3", "yes"]


def _kinds(annotation: Any) -> list[Any]:
    """The kinds a field's annotation names: its types, unions and Optional flattened (None dropped)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [kind for arg in typing.get_args(annotation) for kind in _kinds(arg)]
    return [] if annotation is type(None) else [annotation]


def _scalar_fields(model: type[BaseModel], data: Any, path: str) -> Iterator[tuple[str, list[Any], Any]]:
    """(key path, the value's place in `data` as keys, the scalar kinds it takes), for each scalar in
    the policy: a field, an item of a list of them or a value of a mapping of them."""
    for key, field in model.model_fields.items():
        assert key in data, f"{path}{key}: add it to EVERY_FIELD, so that the walk checks its kind"
        for kind in _kinds(field.annotation):
            origin, args = typing.get_origin(kind), typing.get_args(kind)
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                yield from (
                    (f"{path}{key}.{p}", [key, *at], k) for p, at, k in _scalar_fields(kind, data[key], "")
                )
            elif origin is list and isinstance(args[0], type) and issubclass(args[0], BaseModel):
                inner = _scalar_fields(args[0], data[key][0], "")
                yield from ((f"{path}{key}[0].{p}", [key, 0, *at], k) for p, at, k in inner)
            elif origin is list:
                yield f"{path}{key}[0]", [key, 0], args[0]
            elif origin is dict:
                [first] = list(data[key])[:1]
                yield f"{path}{key}.{first}", [key, first], args[1]
            else:
                yield f"{path}{key}", [key], kind


def _takes(kind: Any, value: object) -> bool:
    if typing.get_origin(kind) is typing.Literal:
        return value in typing.get_args(kind)
    if kind is float:
        return type(value) in (int, float)
    assert kind in (bool, int, float, str), f"a field of kind {kind}: teach this test which values it refuses"
    return type(value) is kind


def test_every_field_refuses_a_value_of_another_kind() -> None:
    # A bool, a string or a float must never become a number, nor a number a string or a bool: a
    # field added without that strictness fails here.
    assert parse_policy(EVERY_FIELD)
    fields: dict[str, tuple[list[Any], list[Any]]] = {}
    for path, at, kind in _scalar_fields(Policy, EVERY_FIELD, ""):
        fields.setdefault(path, (at, []))[1].append(kind)
    assert len(fields) > 40 and "defaults.limits.max_fraction_per_family" in fields
    for path, (at, kinds) in fields.items():
        for wrong in WRONG_KINDS:
            if any(_takes(kind, wrong) for kind in kinds):
                continue
            data = copy.deepcopy(EVERY_FIELD)
            place = data
            for key in at[:-1]:
                place = place[key]
            place[at[-1]] = wrong
            assert f"\n{path}: " in error_of(data), f"{path}: {wrong!r} was taken"


@pytest.mark.parametrize("glob", ["*", "**", "?*", "*?*", "???*", "[!~]*", "*[!~]", "[!~]?*", "[ -~]*[!{]"])
def test_a_name_glob_of_wildcards_only_selects_every_ami_and_is_refused(glob: str) -> None:
    # An AMI's name has 3 to 128 characters: `?*` or `???*` match them all; so does a bracket every
    # character of an AMI's name passes (none is a `~` or a `{`).
    assert "alone would select every AMI" in error_of(
        {**BASE, "families": [{"name": "a", "match": {"name": glob}}]}
    )


def test_a_name_glob_of_only_stars_with_tags_is_taken() -> None:
    narrowed = {**BASE, "families": [{"name": "a", "match": {"name": "*", "tags": {"P": "A"}}}]}
    assert parse_policy(narrowed).families[0].match.name == "*"


def test_file_errors_name_the_file_and_the_place(tmp_path: Path) -> None:
    bad = tmp_path / "janitor.yaml"
    bad.write_text("mode: enforce\nregions: [us-east-1\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(bad)
    message = str(caught.value)
    assert message.startswith(f"{bad}: not valid YAML (line ") and "<unicode string>" not in message
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("mode: dry-run\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(PolicyError, match=r"latin.yaml: not UTF-8 text \(byte 19"):
        load_policy(latin)


def test_a_key_given_twice_is_refused_naming_it(tmp_path: Path) -> None:
    """Both parsers keep the last of two keys silently: a `mode: enforce` further down would win."""
    twice = tmp_path / "twice.yaml"
    twice.write_text(
        "mode: dry-run\nregions: [us-east-1]\nfamilies:\n  - name: app\n    match: {name: app-*}\n"
        "    keep_latest: 5\n    keep_latest: 1\n"
    )
    with pytest.raises(PolicyError) as caught:
        load_policy(twice)
    assert str(caught.value) == f"{twice}: not valid YAML (line 7, column 5: key 'keep_latest' given twice)"
    as_json = tmp_path / "twice.json"
    as_json.write_text('{"mode": "dry-run", "regions": ["us-east-1"], "mode": "enforce"}')
    with pytest.raises(PolicyError) as caught:
        load_policy(as_json)
    assert str(caught.value) == f"{as_json}: not valid JSON (key 'mode' given twice in one object)"
    # A merge key repeats keys on purpose: the mapping's own win, as YAML says.
    merged = tmp_path / "merged.yaml"
    merged.write_text(
        "regions: [us-east-1]\nfamilies:\n  - &app {name: app, match: {name: app-*}, keep_latest: 5}\n"
        "  - <<: *app\n    name: web\n    match: {name: web-*}\n"
    )
    assert [(f.name, f.keep_latest) for f in load_policy(merged).families] == [("app", 5), ("web", 5)]


def test_many_families_load_in_linear_time() -> None:
    families = [{"name": f"f{n}", "match": {"name": f"f{n}-*"}} for n in range(20_000)]
    loaded = parse_policy({"regions": ["us-east-1"], "families": families})
    assert len(loaded.families) == 20_000
    twice = [*families, {"name": "f7", "match": {"name": "x-*"}}]
    assert "family 'f7' is defined twice" in error_of({"regions": ["us-east-1"], "families": twice})


def latest_families(*parameters: str) -> dict[str, object]:
    families = [
        {"name": f"f{n}", "match": {"name": f"f{n}-*"}, "latest": {"ssm_parameter": parameter}}
        for n, parameter in enumerate(parameters)
    ]
    return {"regions": ["us-east-1"], "families": families}


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        (("/ami/latest", "/ami/latest"), "'f0' (latest.ssm_parameter /ami/latest) and 'f1' (/ami/latest) "),
        # One family's name is what the other's template makes for x86_64.
        (("/ami/x86_64", "/ami/{arch}"), "'f0' (latest.ssm_parameter /ami/x86_64) and 'f1' (/ami/{arch}) "),
        (("/ami/{arch}", "/ami/web", "/ami/{arch}"), "'f0' (latest.ssm_parameter /ami/{arch}) and 'f2' "),
        # Another architecture on each side: {arch}_mac with arm64 is {arch} with arm64_mac.
        (
            ("/ami/{arch}_mac", "/ami/web", "/ami/{arch}"),
            "'f0' (latest.ssm_parameter /ami/{arch}_mac) and 'f2' ",
        ),
    ],
)
def test_two_families_may_not_write_one_latest_parameter(parameters: tuple[str, ...], expected: str) -> None:
    # Each family's rotation writes its own AMI there: the parameter would flip between them.
    message = error_of(latest_families(*parameters))
    assert f"(top level): families {expected}" in message, message
    assert "can both write the SSM parameter /ami/" in message, message


def test_the_parameter_two_families_would_share_is_named() -> None:
    message = error_of(latest_families("/ami/{arch}_mac", "/ami/{arch}"))
    assert "can both write the SSM parameter /ami/arm64_mac: each family needs its own" in message, message


def test_families_with_parameters_of_their_own_are_taken() -> None:
    loaded = parse_policy(
        latest_families("/ami/web/{arch}", "/ami/api/{arch}", "/ami/x86_64/latest", "/ami/{arch}")
    )
    assert [f.latest.ssm_parameter for f in loaded.families if f.latest] == [
        "/ami/web/{arch}",
        "/ami/api/{arch}",
        "/ami/x86_64/latest",
        "/ami/{arch}",
    ]


def tagged_latest(tag: str, **defaults: object) -> dict[str, object]:
    families = [
        {"name": "web", "match": {"name": "web-*", "tags": {"Team": "web"}}, "latest": {"tag": tag}},
        {"name": "api", "match": {"name": "api-*"}, "opt_out_tag": "Pinned"},
    ]
    return {"regions": ["us-east-1"], "defaults": defaults, "families": families}


@pytest.mark.parametrize(
    ("tag", "defaults", "role"),
    [
        # The rotation would take it off every opted-out AMI of the group but its target.
        ("ami-janitor:keep", {}, "an opt-out tag"),
        ("Keep", {"opt_out_tag": "Keep"}, "an opt-out tag"),
        ("Pinned", {}, "an opt-out tag"),  # another family's
        # It would move the group's AMIs out of the family.
        ("Team", {}, "a match tag of family 'web'"),
        ("ami-janitor:latest", {}, "one of the janitor's own tags"),
    ],
)
def test_a_latest_tag_with_another_role_is_refused(tag: str, defaults: dict[str, object], role: str) -> None:
    message = error_of(tagged_latest(tag, **defaults))
    assert f"family 'web': latest.tag {tag!r} is {role}; the rotation takes the Latest tag off" in message, (
        message
    )


def test_a_latest_tag_of_its_own_is_taken() -> None:
    assert [f.latest.tag for f in parse_policy(tagged_latest("Latest")).families if f.latest] == ["Latest"]


@pytest.mark.parametrize(
    ("written", "why"),
    [
        ("030", "as octal (YAML 1.1): write it without its leading zeros"),  # 24, not 30
        ("014", "as octal (YAML 1.1): write it without its leading zeros"),  # 12
        ("+030", "as octal (YAML 1.1): write it without its leading zeros"),
        ("1:30", "in base 60 (YAML 1.1): write it without the ':'"),  # 90
        ("0:30.5", "in base 60 (YAML 1.1): write it without the ':'"),  # a float, 30.5
    ],
)
def test_a_number_yaml_reads_otherwise_than_written_is_refused(
    tmp_path: Path, written: str, why: str
) -> None:
    """YAML 1.1 (PyYAML's) reads `min_age_days: 030` as 24: AMIs would be kept 24 days, not 30."""
    policy = tmp_path / "janitor.yaml"
    policy.write_text(
        f"regions: [us-east-1]\ndefaults:\n  min_age_days: {written}\nfamilies: [{{name: a, match: {{name: a-*}}}}]\n"
    )
    with pytest.raises(PolicyError) as caught:
        load_policy(policy)
    assert (
        str(caught.value)
        == f"{policy}: not valid YAML (line 3, column 17: the number {written} would be read {why})"
    )


@pytest.mark.parametrize(("written", "read"), [("30", 30), ("0", 0), ("0x1E", 30), ("1_000", 1000)])
def test_numbers_read_as_written_are_taken(tmp_path: Path, written: str, read: int) -> None:
    policy = tmp_path / "janitor.yaml"
    policy.write_text(
        f"regions: [us-east-1]\ndefaults:\n  min_age_days: {written}\n  limits: {{max_fraction_per_family: 00.5}}\n"
        "families: [{name: a, match: {name: a-*}}]\n"
    )
    loaded = load_policy(policy)
    assert (loaded.defaults.min_age_days, loaded.defaults.limits.max_fraction_per_family) == (read, 0.5)


@pytest.mark.parametrize("glob", ["[a-z]*", "web-*", "[!a]*", "*[!x]", "[]-~ -]*"])
def test_a_name_glob_a_name_can_escape_is_taken(glob: str) -> None:
    # A bracket some character of an AMI's name fails (a letter, `[`, a space) narrows the glob.
    assert (
        parse_policy({**BASE, "families": [{"name": "a", "match": {"name": glob}}]}).families[0].match.name
        == glob
    )


def test_a_bake_whose_images_another_family_selects_too_is_refused() -> None:
    """Every bake of pettracker-ml would match pettracker's glob too: kept as a policy error, never
    Latest, so each scheduled bake made an image its family never rotated, shared or copied."""
    ml = {
        "name": "pettracker-ml",
        "match": {"tags": {"Project": "PetTracker"}, "name": "pettracker-ml-*"},
        "bake": {"instance_tag": {"Role": "build"}, "schedule": "cron(0 2 * * ? *)"},
    }
    broad = {"name": "pettracker", "match": {"name": "pettracker-*"}}
    message = error_of({"regions": ["us-east-1"], "families": [broad, ml]})
    assert (
        "family 'pettracker-ml' bakes images like pettracker-ml-20261125T030000Z, which family 'pettracker' "
        "selects too"
    ) in message, message
    # Told apart by a tag the bake does not write, or a glob that misses, it is taken.
    for apart in ({"name": "pettracker-*", "tags": {"Project": "Other"}}, {"name": "pettracker-api-*"}):
        parse_policy({"regions": ["us-east-1"], "families": [{**broad, "match": apart}, ml]})


def test_an_organizations_inbox_names_the_account_that_owns_it() -> None:
    """Deployed to an organization, members use the inbox before (or without) the stack that makes it:
    without inbox_account, whoever took the name first would read and write every report."""
    unchecked = {**EVERY_FIELD, "usage_reports": {**EVERY_FIELD["usage_reports"], "inbox_account": None}}  # type: ignore[dict-item]
    assert "usage_reports.inbox_account: required with organization" in error_of(unchecked)
    alone = {k: v for k, v in unchecked.items() if k != "organization"}
    assert parse_policy(alone).usage_reports is not None
