"""Helpers of the infrastructure tests: run app.py as `cdk synth` does and read the cloud assembly."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TEST_POLICY = HERE / "policy.yaml"
# The same kind of policy with `organization` and `usage_reports`: the app adds the StackSet's stacks.
ORG_POLICY = HERE / "org_policy.yaml"


@dataclass
class Synth:
    """A cloud assembly synthesized from the test policy."""

    outdir: Path
    stderr: str

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.outdir / "manifest.json").read_text())

    def stack_names(self) -> list[str]:
        return sorted(
            name
            for name, artifact in self.manifest["artifacts"].items()
            if artifact["type"] == "aws:cloudformation:stack"
        )

    def template(self, stack: str) -> dict[str, Any]:
        return json.loads((self.outdir / f"{stack}.template.json").read_text())

    def stack_set_templates(self) -> list[Path]:
        """The StackSet member templates (cdk-stacksets writes them beside the stacks, not as artifacts)."""
        return sorted(self.outdir.glob("*.stackset.template.json"))

    def member_template(self) -> dict[str, Any]:
        [path] = self.stack_set_templates()
        return json.loads(path.read_text())

    def assets(self, stack: str) -> dict[str, Any]:
        return json.loads((self.outdir / f"{stack}.assets.json").read_text())

    def code_asset_dir(self, stack: str) -> Path:
        """The directory of the (single) Lambda code asset of a stack, as staged in cdk.out."""
        dirs = {
            self.outdir / entry["source"]["path"]
            for entry in self.assets(stack)["files"].values()
            if entry["source"].get("packaging") == "zip"
        }
        assert len(dirs) == 1, dirs
        return dirs.pop()


def cdk_context() -> dict[str, Any]:
    """The context cdk.json gives the app (feature flags), as the CDK CLI would pass it."""
    return dict(json.loads((REPO_ROOT / "cdk.json").read_text())["context"])


def app_environment(policy: Path, outdir: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDK_", "AWS_"))}
    env.update(
        AMI_JANITOR_CONFIG=str(policy),
        JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION="20",
        CDK_CONTEXT_JSON=json.dumps(cdk_context()),
    )
    if outdir is not None:
        env["CDK_OUTDIR"] = str(outdir)
    return env


def run_app(policy: Path, outdir: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run app.py the way `cdk synth` does (context and output directory through the environment)."""
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "app.py")],
        cwd=REPO_ROOT,
        env=app_environment(policy, outdir),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def resources(template: dict[str, Any], type_: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in template["Resources"].items() if v["Type"] == type_}


def ref_id(value: Any) -> str | None:
    """The logical id a Ref or Fn::GetAtt points at."""
    if isinstance(value, dict):
        if "Ref" in value:
            return str(value["Ref"])
        if "Fn::GetAtt" in value:
            return str(value["Fn::GetAtt"][0])
    return None


def functions_by_handler(template: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Handler module name (scheduled, ami_event, replicate, bake) -> (logical id, properties)."""
    out = {}
    for logical_id, resource in resources(template, "AWS::Lambda::Function").items():
        handler = resource["Properties"]["Handler"]
        module = handler.rsplit(".", 1)[0].rsplit(".", 1)[-1]
        out[module] = (logical_id, resource["Properties"])
    return out


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


TEST_ACCOUNT = "123456789012"


def flatten(value: Any) -> str:
    """A template value as a string: pseudo parameters filled in, other references as <LogicalId>."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if "Fn::Join" in value:
            delimiter, parts = value["Fn::Join"]
            return str(delimiter).join(flatten(p) for p in parts)
        if value.get("Ref") == "AWS::AccountId":
            return TEST_ACCOUNT
        if value.get("Ref") == "AWS::Partition":
            return "aws"
        if "Ref" in value or "Fn::GetAtt" in value:
            return f"<{ref_id(value)}>"
    raise AssertionError(f"unexpected template value {value!r}")


class ServiceAuthorization:
    """Actions, resource ARN formats and condition keys of the Service Authorization Reference, from
    the copy cfn-lint ships (cfnlint/data/AdditionalSpecs/Policies.json)."""

    # Keys defined per action or per service rather than per resource type (cfn-lint's copy lists
    # only the resource-type keys): where each one is documented.
    ACTION_KEYS = {
        "aws:RequestedRegion": "every action: a global condition key (the region the request is made in)",
        "ec2:CreateAction": "CreateTags: the API that creates and tags a resource",
        "kms:ViaService": "every KMS key operation",
        "kms:CallerAccount": "every KMS key operation",
        "kms:GrantIsForAWSResource": "CreateGrant, ListGrants, RevokeGrant",
        "cloudwatch:namespace": "PutMetricData",
        "s3:prefix": "ListBucket: the key prefix listed",
    }

    def __init__(self) -> None:
        import cfnlint

        path = Path(cfnlint.__file__).parent / "data" / "AdditionalSpecs" / "Policies.json"
        self._data = json.loads(path.read_text())

    def _service(self, action: str) -> tuple[dict[str, Any], str]:
        service, name = action.split(":", 1)
        return self._data[service], name.lower()

    def resource_types(self, action: str) -> list[str]:
        service, name = self._service(action)
        actions = {k.lower(): v for k, v in service["Actions"].items()}
        assert name in actions, f"{action} is not an IAM action"
        return list(actions[name].get("Resources", []))

    def _resource(self, action: str, resource_type: str) -> dict[str, Any]:
        service, _ = self._service(action)
        # The copy spells a few resource type names with another case in the actions table.
        types = {k.lower(): v for k, v in service["Resources"].items()}
        return dict(types[resource_type.lower()])

    def arn_patterns(self, action: str) -> list[re.Pattern[str]]:
        patterns = []
        for resource_type in self.resource_types(action):
            for arn_format in self._resource(action, resource_type)["ARNFormats"]:
                regex = re.escape(arn_format).replace(r"\.\*", ".*")
                regex = regex.replace(re.escape("${Partition}"), "aws[a-z-]*")
                regex = regex.replace(re.escape("${Region}"), "[a-z0-9-]+")
                regex = regex.replace(re.escape("${Account}"), r"\d{12}")
                patterns.append(re.compile(f"^{regex}$"))
        return patterns

    def condition_key_supported(self, action: str, key: str) -> bool:
        if key in self.ACTION_KEYS:
            return True
        for resource_type in self.resource_types(action):
            for pattern in self._resource(action, resource_type).get("ConditionKeys", []):
                regex = re.escape(pattern).replace(re.escape("${TagKey}"), ".+")
                if re.fullmatch(regex, key):
                    return True
        return False

    def check_statement(self, actions: list[str], resources: list[str], condition: dict[str, Any]) -> None:
        """Raise AssertionError where the statement asks for something the reference does not offer."""
        for action in actions:
            if not self.resource_types(action):
                assert resources == ["*"], f"{action} supports no resource-level permission"
                continue
            # "*" (read-only calls) and the stack's own resources (by logical id) need no format check.
            explicit = [r for r in resources if r != "*" and not r.startswith("<")]
            patterns = self.arn_patterns(action) if explicit else []
            for resource in explicit:
                # Each resource must fit a type the action supports (a statement may list several).
                assert any(p.match(resource) for p in patterns), f"{action}: {resource} fits no ARN format"
            for operator_keys in condition.values():
                for key in operator_keys:
                    assert self.condition_key_supported(action, key), f"{action} does not support {key}"
