"""Policy-file values the loader refuses because they cannot mean what the README says, each named by its
key path; and the values beside them it still takes."""

from __future__ import annotations

from pathlib import Path

import pytest

from ami_janitor.core.policy import PolicyError, load_policy

BASE = """\
mode: dry-run
regions: [us-east-1]
families:
  - name: web
    match: {name: "web-*"}
"""


def load(tmp_path: Path, text: str) -> str:
    """The PolicyError's message (the test fails where the file is taken)."""
    path = tmp_path / "janitor.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as error:
        load_policy(path)
    return str(error.value)


def test_a_region_named_twice_is_refused_naming_regions(tmp_path: Path) -> None:
    # Taken, it made `bake` (which acts in the one region a family bakes in) ask for --region, and a
    # pinned bake.instance_id "an instance of one region" that "bakes in us-east-1, us-east-1".
    message = load(tmp_path, BASE.replace("[us-east-1]", "[us-east-1, eu-west-1, us-east-1]"))
    assert "regions: " in message and "us-east-1" in message and "twice" in message


@pytest.mark.parametrize(
    "tag",
    [
        "ami-janitor:candidate-since",  # written on every candidate: rescued by the next run, forever
        "ami-janitor:prior-deprecation",
        "ami-janitor:source-image",  # on every replica the janitor makes
        "ami-janitor:baked-from",  # on every image the janitor bakes
        "ami-janitor:shared",
    ],
)
@pytest.mark.parametrize("where", ["defaults", "family"])
def test_an_opt_out_tag_the_janitor_writes_itself_is_refused(tmp_path: Path, tag: str, where: str) -> None:
    # With opt_out_tag ami-janitor:candidate-since, an enforce apply marks each candidate (writing the
    # tag), the next run rescues it as opted out (removing the tag), the next marks it again: with any
    # disable_after_days above 0 nothing is ever retired, and every plan says it will be.
    if where == "defaults":
        text = BASE + f"defaults: {{opt_out_tag: '{tag}'}}\n"
        path = "defaults.opt_out_tag"
    else:
        text = BASE + f"    opt_out_tag: '{tag}'\n"
        path = "families[0]"
    message = load(tmp_path, text)
    assert path in message and tag in message


def test_an_opt_out_tag_of_the_users_own_under_the_janitors_prefix_is_still_taken(tmp_path: Path) -> None:
    # README ("Guardrails for organizations"): opt_out_tag may name other ami-janitor: keys.
    path = tmp_path / "janitor.yaml"
    path.write_text(BASE + "defaults: {opt_out_tag: 'ami-janitor:hold'}\n")
    assert load_policy(path).defaults.opt_out_tag == "ami-janitor:hold"


@pytest.mark.parametrize("tag", ["aws:latest", "AWS:Latest"])
def test_a_latest_tag_ec2_reserves_is_refused(tmp_path: Path, tag: str) -> None:
    # EC2 refuses a tag key beginning with aws: (any case): every rotation would fail, as a reserved SSM
    # parameter name would (which the loader already refuses).
    message = load(tmp_path, BASE + f"    latest: {{tag: '{tag}'}}\n")
    assert "families[0].latest.tag" in message


@pytest.mark.parametrize(
    "schedule",
    [
        "cron(60 3 * * ? *)",  # minutes are 0-59
        "cron(0 24 * * ? *)",  # hours are 0-23
        "cron(0 3 32 * ? *)",  # days of the month are 1-31
        "cron(0 3 * 13 ? *)",  # months are 1-12 or JAN-DEC
        "cron(0 3 ? * 8 *)",  # days of the week are 1-7 or SUN-SAT
        "cron(0 3 * * ? 3000)",  # years are 1970-2199
        "cron(a b * * ? *)",
        "cron(0 3 * * ? *x)",
    ],
)
def test_a_cron_eventbridge_refuses_at_deploy_is_refused(tmp_path: Path, schedule: str) -> None:
    # README: the loader refuses "a schedule EventBridge would refuse at deploy".
    for text, path in (
        (BASE + f"schedule: '{schedule}'\n", "schedule: "),
        (
            BASE + f"    bake: {{instance_tag: {{Role: web}}, schedule: '{schedule}'}}\n",
            "families[0].bake.schedule",
        ),
    ):
        message = load(tmp_path, text)
        assert path in message and schedule in message


@pytest.mark.parametrize(
    "schedule",
    [
        "cron(0 3 * * ? *)",
        "cron(0/15 * * * ? *)",
        "cron(0 8-18/2 ? * MON-FRI *)",
        "cron(15 10 ? * 6L 2026-2030)",
        "cron(0 12 L * ? *)",
        "cron(0 9 15W * ? *)",
        "cron(0 9 LW * ? *)",
        "cron(0 9 ? * 2#1 *)",
        "cron(0 9 ? * MON#2 *)",
        "cron(0,30 1,13 1,15 JAN,JUL ? *)",
        "cron(59 23 31 DEC ? 2199)",
        "cron(0 0 ? * SUN-SAT 1970/5)",
        "cron(0 0 ? * L *)",
    ],
)
def test_a_cron_eventbridge_takes_is_taken(tmp_path: Path, schedule: str) -> None:
    path = tmp_path / "janitor.yaml"
    path.write_text(BASE + f"schedule: '{schedule}'\n")
    assert load_policy(path).schedule == schedule
