"""Claims: a resource naming an image value, directly or through a launch template version.

A claim's value is an AMI id, a `resolve:ssm:` alias, or text holding AMI ids (an SSM parameter's value);
`references_of` turns claims into the inventory's references once the aliases are resolved.
"""

import re
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from ami_janitor.aws.inventory.reading import Raw
from ami_janitor.core.model import Reference

ALIAS_PREFIX = "resolve:ssm:"
_AMI_ID = re.compile(r"\bami-[0-9a-f]+\b")


class Claim(NamedTuple):
    """A resource naming an image value (an AMI id, a resolve:ssm: alias, or text holding AMI ids)."""

    value: str
    kind: str
    resource_id: str
    subject: str
    verb: str = "referenced by"


def claim(value: Any, kind: str, resource_id: str, subject: str, verb: str = "referenced by") -> list[Claim]:
    """The resource's claim, or none when the value is empty (the resource names no image)."""
    return [Claim(str(value), kind, resource_id, subject, verb)] if value else []


class Spec(NamedTuple):
    """A launch template and version as an ASG, a fleet or Batch names it."""

    template_id: str | None
    template_name: str | None
    version: str

    @classmethod
    def of(cls, raw: Raw) -> "Spec":
        # EC2 and Auto Scaling spell it LaunchTemplateId; Batch spells it launchTemplateId.
        return cls(
            template_id=raw.get("LaunchTemplateId") or raw.get("launchTemplateId"),
            template_name=raw.get("LaunchTemplateName") or raw.get("launchTemplateName"),
            version=str(raw.get("Version") or raw.get("version") or "$Default"),
        )

    @property
    def label(self) -> str:
        return f"{self.template_id or self.template_name} version {self.version}"


class TemplateUse(NamedTuple):
    """A resource launching from a launch template version: a claim on whatever image that version names."""

    kind: str
    resource_id: str
    subject: str
    spec: Spec


class Claims:
    """What one source's resources name, in the order it read them: images, and launch templates."""

    __slots__ = ("claims", "uses")

    def __init__(self, claims: list[Claim] | None = None, uses: list[TemplateUse] | None = None) -> None:
        self.claims: list[Claim] = [] if claims is None else claims
        self.uses: list[TemplateUse] = [] if uses is None else uses

    def claim(self, value: Any, kind: str, resource_id: str, subject: str) -> None:
        self.claims += claim(value, kind, resource_id, subject)

    def use_template(self, kind: str, resource_id: str, subject: str, raw_spec: Raw | None) -> None:
        spec = Spec.of(raw_spec) if raw_spec else None
        if spec is not None and (spec.template_id or spec.template_name):
            self.uses.append(TemplateUse(kind, resource_id, subject, spec))


def named_aliases(claims: Iterable[Claim]) -> set[str]:
    """The resolve:ssm: aliases among the claims' values."""
    return {c.value for c in claims if c.value.startswith(ALIAS_PREFIX)}


def references_of(claims: Iterable[Claim], resolved: Mapping[str, str]) -> tuple[list[Reference], list[str]]:
    """The references the claims make, aliases read through `resolved` (alias -> parameter value),
    and a note for each alias that resolves to nothing."""
    found: dict[tuple[str, str, str, str], Reference] = {}
    notes: list[str] = []
    for each in claims:
        if each.value.startswith(ALIAS_PREFIX):
            target = resolved.get(each.value)
            if target is None:
                missing = "a parameter that does not exist or cannot be read"
                notes.append(f"{each.subject} names {each.value}, {missing}")
                continue
            detail = f"{each.subject} resolves {each.value} to it"
        else:
            target, detail = each.value, f"{each.verb} {each.subject}"
        for image_id in _AMI_ID.findall(target):
            key = (image_id, each.kind, each.resource_id, detail)
            found[key] = Reference(
                image_id=image_id, kind=each.kind, resource_id=each.resource_id, detail=detail
            )
    return list(found.values()), notes
