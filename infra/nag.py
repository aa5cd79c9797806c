"""cdk-nag acknowledgements: each one names the rule finding and says why it does not apply."""

from __future__ import annotations

import json
from typing import Any

from aws_cdk import Acknowledgment, Stack, Validations
from constructs import IConstruct


def acknowledge(construct: IConstruct, rule: str, reason: str) -> None:
    Validations.of(construct).acknowledge(Acknowledgment(id=rule, reason=reason))


def wildcard_resource_findings(construct: IConstruct, resources: list[str]) -> list[str]:
    """The AwsSolutions-IAM5 finding ids cdk-nag reports for these statement resources."""
    stack = Stack.of(construct)
    findings = []
    for resource in resources:
        flat = _flatten(stack.resolve(resource))
        if "*" in flat:
            findings.append(f"AwsSolutions-IAM5[Resource::{flat}]")
    return findings


def _flatten(node: Any) -> str:
    # The same flattening cdk-nag applies to a resolved CloudFormation value before matching.
    if node is None:
        return ""
    if isinstance(node, str):
        return node.replace("${", "<").replace("}", ">")
    if isinstance(node, dict):
        if "Fn::Join" in node:
            delimiter, items = node["Fn::Join"]
            return str(delimiter).join(_flatten(item) for item in items)
        if "Fn::Sub" in node:
            return _flatten(node["Fn::Sub"])
        if "Fn::GetAtt" in node:
            resource, attribute = node["Fn::GetAtt"]
            return f"<{_flatten(resource)}.{_flatten(attribute)}>"
        if "Fn::ImportValue" in node:
            return _flatten(node["Fn::ImportValue"])
        if "Ref" in node:
            return f"<{_flatten(node['Ref'])}>"
    return json.dumps(node, separators=(",", ":"))
