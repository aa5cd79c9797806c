"""What a document that fails validation is reported as: each problem once, the first ones named and a
count, so that another account's usage report of many thousand bad values is named in one bounded line
(the owner's run reads every consumer's report, and keeps what a bad one concerns)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from ami_janitor.core.usage import UsageReport
from ami_janitor.core.validation import MAX_PROBLEMS_NAMED, describe_validation_error


def report_with_bad_uses(count: int) -> str:
    uses = {f"ami-{n:017x}": [0] for n in range(count)}  # a number where a text is expected
    return json.dumps(
        {
            "account": "111122223333",
            "region": "us-east-1",
            "generated_at": "2026-12-01T00:00:00Z",
            "uses": uses,
        }
    )


def test_a_report_of_thousands_of_bad_values_is_named_by_its_first_problems_and_their_count() -> None:
    with pytest.raises(ValidationError) as caught:
        UsageReport.model_validate_json(report_with_bad_uses(30_000))

    message = describe_validation_error(caught.value)

    problems = message.split("; ")
    assert len(problems) == MAX_PROBLEMS_NAMED + 1
    assert problems[0] == "uses.ami-00000000000000000[0]: Input should be a valid string"
    assert problems[-1] == "... (30,000 problems in all)"
    assert len(message) < 100 * MAX_PROBLEMS_NAMED


def test_the_same_problem_is_named_once_and_a_few_are_named_all() -> None:
    with pytest.raises(ValidationError) as caught:
        UsageReport.model_validate_json(report_with_bad_uses(3))

    assert describe_validation_error(caught.value) == "; ".join(
        f"uses.ami-{n:017x}[0]: Input should be a valid string" for n in range(3)
    )
