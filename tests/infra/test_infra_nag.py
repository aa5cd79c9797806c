"""cdk-nag AwsSolutions: no finding is left unacknowledged, and no acknowledgement is stale.

The synth of app.py already fails on a nag error; warnings only print, so this test reads the pack's
report directly, errors and warnings alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aws_cdk import App
from cdk_nag import AwsSolutionsChecks
from synth_support import cdk_context

pytestmark = pytest.mark.slow  # synthesizes the stacks (or reads their synthesized templates)


@dataclass(frozen=True)
class Finding:
    rule: str
    path: str  # construct path of the CloudFormation resource


@dataclass(frozen=True)
class Acknowledgement:
    rule: str
    path: str  # construct path the acknowledgement was made on (covers its children)
    reason: str


def _build(policy: Any, outdir: Path) -> App:
    from infra.stack import build_app

    return build_app(policy, context=cdk_context(), outdir=str(outdir), nag=False)


def _findings(app: App) -> list[Finding]:
    report = AwsSolutionsChecks().validate_scope(app)
    return [
        Finding(v.rule_name, r.construct_path or "") for v in report.violations for r in v.violating_resources
    ]


@pytest.fixture(scope="module", params=["regional", "organization"])
def nag_policy(request: pytest.FixtureRequest, infra_policy: Any, org_policy: Any) -> Any:
    """The regional stacks alone, and with the organization's (StackSet, member template, code buckets,
    usage inbox)."""
    return infra_policy if request.param == "regional" else org_policy


@pytest.fixture(scope="module")
def acknowledged_app(nag_policy: Any, tmp_path_factory: pytest.TempPathFactory) -> App:
    return _build(nag_policy, tmp_path_factory.mktemp("nag"))


@pytest.fixture(scope="module")
def unacknowledged(
    nag_policy: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[list[Finding], list[Acknowledgement]]]:
    """The same app built with acknowledgements recorded instead of applied."""
    import infra.nag

    recorded: list[Acknowledgement] = []

    class _Recorder:
        def __init__(self, construct: Any) -> None:
            self.path = construct.node.path

        def acknowledge(self, *rules: Any) -> None:
            recorded.extend(Acknowledgement(r.id, self.path, r.reason) for r in rules)

    class _Validations:
        @staticmethod
        def of(construct: Any) -> _Recorder:
            return _Recorder(construct)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(infra.nag, "Validations", _Validations)
        app = _build(nag_policy, tmp_path_factory.mktemp("nag-raw"))
        yield _findings(app), recorded


def test_no_unacknowledged_findings(acknowledged_app: App) -> None:
    findings = _findings(acknowledged_app)
    assert findings == [], "\n".join(f"{f.rule} at {f.path}" for f in findings)


def test_the_member_template_is_checked(
    nag_policy: Any, unacknowledged: tuple[list[Finding], list[Acknowledgement]]
) -> None:
    """cdk-nag reaches into the StackSet's member stack: unacknowledged, its wildcards are findings."""
    if nag_policy.organization is None:
        pytest.skip("no StackSet without organization")
    findings, _ = unacknowledged
    assert any(f.path.startswith("AmiJanitorOrg/Member/") for f in findings)


def test_every_acknowledgement_is_needed_and_explained(
    unacknowledged: tuple[list[Finding], list[Acknowledgement]],
) -> None:
    findings, acknowledgements = unacknowledged
    assert acknowledgements

    def covers(ack: Acknowledgement, finding: Finding) -> bool:
        return ack.rule == finding.rule and (
            finding.path == ack.path or finding.path.startswith(ack.path + "/")
        )

    for ack in acknowledgements:
        assert any(covers(ack, f) for f in findings), f"stale acknowledgement {ack.rule} at {ack.path}"
        assert len(ack.reason) >= 40, f"say why {ack.rule} does not apply at {ack.path}"
    for finding in findings:
        assert any(covers(a, finding) for a in acknowledgements), f"{finding.rule} at {finding.path}"
