"""Every SQS queue policy and IAM role policy the stacks make fits its quota, however many families bake.

SQS refuses a queue policy of more than 20 statements or 8,192 bytes (Amazon SQS policy quotas); IAM, a
role's inline policies over 10,240 characters. The stack then fails at deploy and rolls back, though it
synthesized clean. The event-target dead-letter queue of the bake rules (the region's shared one in a
regional stack, the bake schedule's own in the member template) lets EventBridge send for each rule
that names it, and the bake and operator roles may image each family's build instance: neither may
take a statement per family, or a policy of some 17 baked families fails in AWS.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from synth_support import Synth, resources, run_app

pytestmark = pytest.mark.slow  # synthesizes the stacks

# Amazon SQS policy quotas.
MAX_STATEMENTS = 20
MAX_BYTES = 8192
FAMILIES = 20  # the scale the README plans for ("about 20 such families")
ACCOUNT = "123456789012"


def _policy_yaml() -> str:
    lines = [
        "mode: dry-run",
        "regions: [us-east-1]",
        'schedule: "cron(0 3 * * ? *)"',
        "organization:",
        "  id: o-a1b2c3d4e5",
        "  deploy_to: [ou-ab12-cdef3456]",
        "  code_bucket_prefix: example-ami-janitor-code",
        'usage_reports: {inbox: s3://example-ami-usage/janitor, inbox_account: "123456789012"}',
        "families:",
    ]
    for n in range(FAMILIES):
        name = f"golden-image-{n:02d}"
        lines += [
            f"  - name: {name}",
            f'    match: {{tags: {{Family: {name}}}, name: "{name}-*"}}',
            f'    bake: {{instance_tag: {{Role: {name}}}, schedule: "cron({n} 2 * * ? *)"}}',
        ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def many_bakes() -> Iterator[dict[str, dict[str, Any]]]:
    work = Path(tempfile.mkdtemp(prefix="ami-janitor-many-bakes-"))
    try:
        policy = work / "policy.yaml"
        policy.write_text(_policy_yaml(), encoding="utf-8")
        result = run_app(policy, work / "cdk.out")
        if result.returncode != 0:
            pytest.fail(f"synth failed:\n{result.stdout}\n{result.stderr}")
        synth = Synth(outdir=work / "cdk.out", stderr=result.stderr)
        # Read everything now: the directory goes with the fixture.
        templates = {name: synth.template(name) for name in synth.stack_names()}
        templates["member"] = synth.member_template()
        yield templates
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _deployed(value: Any, template: dict[str, Any], region: str) -> Any:
    """The value as CloudFormation would pass it to SQS, each generated name at its longest (a rule's
    name 64 characters, a queue's 80): an upper bound on the policy's size."""
    if isinstance(value, list):
        return [_deployed(v, template, region) for v in value]
    if not isinstance(value, dict):
        return value
    if "Fn::GetAtt" in value:
        logical_id, _ = value["Fn::GetAtt"]
        kind = template["Resources"][logical_id]["Type"]
        if kind == "AWS::Events::Rule":
            return f"arn:aws:events:{region}:{ACCOUNT}:rule/{'r' * 64}"
        if kind == "AWS::SQS::Queue":
            name = template["Resources"][logical_id]["Properties"].get("QueueName", "q" * 80)
            return f"arn:aws:sqs:{region}:{ACCOUNT}:{name}"
        return "x" * 128
    if "Ref" in value:
        return {"AWS::AccountId": ACCOUNT, "AWS::Region": region, "AWS::Partition": "aws"}.get(
            value["Ref"], "x" * 80
        )
    if "Fn::Join" in value:
        delimiter, parts = value["Fn::Join"]
        return delimiter.join(str(_deployed(p, template, region)) for p in parts)
    return {k: _deployed(v, template, region) for k, v in value.items()}


@pytest.mark.parametrize("stack", ["AmiJanitor-us-east-1", "member"])
def test_queue_policies_fit_sqs_quotas_with_many_scheduled_bakes(
    many_bakes: dict[str, dict[str, Any]], stack: str
) -> None:
    template = many_bakes[stack]
    bake_rules = [
        k for k, r in resources(template, "AWS::Events::Rule").items() if k.startswith("BakeScheduleFamily")
    ]
    assert len(bake_rules) == FAMILIES
    for logical_id, policy in resources(template, "AWS::SQS::QueuePolicy").items():
        document = _deployed(policy["Properties"]["PolicyDocument"], template, "us-east-1")
        statements = len(document["Statement"])
        size = len(json.dumps(document, separators=(",", ":")))
        assert statements <= MAX_STATEMENTS, f"{stack} {logical_id}: {statements} statements (SQS takes 20)"
        assert size <= MAX_BYTES, f"{stack} {logical_id}: {size} bytes (SQS takes 8,192)"


def test_every_bake_rule_may_still_send_its_failed_deliveries(many_bakes: dict[str, dict[str, Any]]) -> None:
    """Whatever shape the statements take, EventBridge may send each rule's failed deliveries to the
    dead-letter queue its target names, and only those rules'."""
    for stack in ("AmiJanitor-us-east-1", "member"):
        template = many_bakes[stack]
        rules = resources(template, "AWS::Events::Rule")
        for rule_id, rule in rules.items():
            [target] = rule["Properties"]["Targets"]
            queue = target["DeadLetterConfig"]["Arn"]["Fn::GetAtt"][0]
            allowed = set()
            for policy in resources(template, "AWS::SQS::QueuePolicy").values():
                if [q.get("Ref") for q in policy["Properties"]["Queues"]] != [queue]:
                    continue
                for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
                    if statement["Effect"] == "Allow" and statement["Principal"] == {
                        "Service": "events.amazonaws.com"
                    }:
                        sources = statement["Condition"]["ArnEquals"]["aws:SourceArn"]
                        sources = sources if isinstance(sources, list) else [sources]
                        allowed |= {s["Fn::GetAtt"][0] for s in sources}
            assert rule_id in allowed, (stack, rule_id)
            assert allowed <= set(rules), (stack, allowed - set(rules))


# IAM: a role's inline policies together take at most 10,240 characters (whitespace not counted).
MAX_ROLE_INLINE_CHARACTERS = 10_240


@pytest.mark.parametrize("stack", ["AmiJanitor-us-east-1", "member"])
def test_role_policies_fit_iam_quotas_with_many_scheduled_bakes(
    many_bakes: dict[str, dict[str, Any]], stack: str
) -> None:
    """Each family that bakes adds its build instances' grants to the bake role: with 20 of them, every
    role's inline policies still fit IAM's quota, each generated name at its longest."""
    template = many_bakes[stack]
    sizes: dict[str, int] = {}
    for policy in resources(template, "AWS::IAM::Policy").values():
        document = _deployed(policy["Properties"]["PolicyDocument"], template, "us-east-1")
        size = len(json.dumps(document, separators=(",", ":")))
        for role in policy["Properties"].get("Roles", []):
            sizes[role["Ref"]] = sizes.get(role["Ref"], 0) + size
    for role_id, role in resources(template, "AWS::IAM::Role").items():
        for inline in role["Properties"].get("Policies", []):
            document = _deployed(inline["PolicyDocument"], template, "us-east-1")
            sizes[role_id] = sizes.get(role_id, 0) + len(json.dumps(document, separators=(",", ":")))
    assert sizes
    over = {role: size for role, size in sizes.items() if size > MAX_ROLE_INLINE_CHARACTERS}
    assert not over, f"{stack}: inline policies over IAM's 10,240 characters: {over}"
