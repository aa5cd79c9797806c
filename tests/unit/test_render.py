"""What people read: shares in words, skipped regions in the summary, what a rescue means next."""

from __future__ import annotations

import io

from ami_janitor.aws.executor import ActionResult
from ami_janitor.cli import render
from ami_janitor.core.model import Plan, RegionStatus, Share


def test_the_plan_names_shares_in_words_and_skipped_regions_in_its_summary() -> None:
    plan = Plan(
        mode="dry-run",
        generated_at="2026-11-30T00:00:00Z",
        regions=[
            RegionStatus(region="eu-west-1", status="skipped", error="ec2:DescribeImages: InternalError"),
            RegionStatus(region="us-east-1", status="ok"),
        ],
        decisions=[],
        shares=[Share(image_id="ami-1", region="us-east-1", add=["user:111122223333", "group:all"])],
    )
    out = io.StringIO()
    render.print_plan(plan, out)
    text = out.getvalue()
    assert "us-east-1 ami-1: grant user:111122223333, group:all; revoke -" in text
    assert "['" not in text
    assert text.rstrip().endswith("regions skipped: eu-west-1")


def test_a_rescue_says_the_ami_may_become_a_candidate_again() -> None:
    out = io.StringIO()
    rescued = ActionResult(
        region="us-east-1", image_id="ami-1", action="rescue", status="ok", detail="enabled"
    )
    render.print_rescue([rescued], out)
    assert "becomes a candidate with a new clock" in out.getvalue()


def test_tables_fit_120_columns_with_reasons_wrapped() -> None:
    reasons = "; ".join(f"reason number {n} with a few words" for n in range(12))
    rows = [["REGION", "IMAGE", "REASONS"], ["us-east-1", "ami-0123456789abcdef0", reasons]]
    out = io.StringIO()
    render.table(rows, out)
    lines = out.getvalue().splitlines()
    assert all(len(line) <= 120 for line in lines), max(len(line) for line in lines)
    assert len(lines) > 2
    assert " ".join(line.strip() for line in lines[1:]).endswith(reasons.split("; ")[-1])
    # continuation lines start under the column
    assert lines[2].startswith(" " * (len("us-east-1") + 2 + len("ami-0123456789abcdef0") + 2))


def test_rotate_never_says_every_pointer_is_current_when_a_region_was_unread() -> None:
    from ami_janitor.aws.rotator import RotationResult

    unread = RotationResult.unreadable("us-east-1", "ec2:DescribeImages: EndpointConnectionError: refused")
    out = io.StringIO()
    render.print_planned_rotations("dry-run", [], out, unread=1)
    render.print_rotations([unread], out)
    text = out.getvalue()
    assert "every Latest pointer is current" not in text
    assert "us-east-1: skipped, could not be read (ec2:DescribeImages: EndpointConnectionError" in text
    assert "-> None" not in text


def test_rotate_names_the_parameter_where_the_tag_is_on_the_target_already() -> None:
    from ami_janitor.core.model import LatestChange

    group = {"region": "us-east-1", "family": "web", "architecture": "x86_64", "from": "ami-2"}
    parameter_only = LatestChange.model_validate({**group, "to": "ami-2", "ssm_parameter": "/ami/web"})
    moved = LatestChange.model_validate({**group, "to": "ami-3"})
    two_holders = LatestChange.model_validate({**group, "to": "ami-2", "untag": ["ami-1"]})
    out = io.StringIO()
    render.print_planned_rotations("dry-run", [parameter_only, moved, two_holders], out)
    lines = out.getvalue().splitlines()
    assert lines[1] == "  us-east-1 web x86_64: ami-2 (tagged already; /ami/web to be written)"
    assert lines[2] == "  us-east-1 web x86_64: ami-2 -> ami-3"
    assert lines[3] == "  us-east-1 web x86_64: ami-2 (tagged already; untag ami-1)"
