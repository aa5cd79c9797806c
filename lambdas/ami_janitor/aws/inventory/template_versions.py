"""The launch template versions loaded so far, and how a launch template spec resolves to one of them."""

from __future__ import annotations

import copy

from ami_janitor.aws.inventory.claims import Spec
from ami_janitor.aws.inventory.reading import Raw


class Template:
    __slots__ = ("default", "latest", "name", "template_id")

    def __init__(
        self, template_id: str, name: str, default: int | None = None, latest: int | None = None
    ) -> None:
        self.template_id = template_id
        self.name = name
        self.default = default
        self.latest = latest


class Templates:
    """Templates by id and the image each loaded version names."""

    __slots__ = ("by_id", "by_spec", "image_of")

    def __init__(
        self,
        by_id: dict[str, Template] | None = None,
        image_of: dict[tuple[str, int], str] | None = None,
        by_spec: dict[tuple[str, str], tuple[str, int]] | None = None,
    ) -> None:
        self.by_id: dict[str, Template] = {} if by_id is None else by_id
        # (template id, version) -> the version's ImageId ("" when it names none).
        self.image_of: dict[tuple[str, int], str] = {} if image_of is None else image_of
        # Specs of templates missing from the listing, fetched one by one: (id or name, version) -> key.
        self.by_spec: dict[tuple[str, str], tuple[str, int]] = {} if by_spec is None else by_spec

    def copy(self) -> Templates:
        return copy.deepcopy(self)

    def add_template(self, raw: Raw) -> Template:
        template = self._template(str(raw["LaunchTemplateId"]), str(raw.get("LaunchTemplateName") or ""))
        template.default = raw.get("DefaultVersionNumber")
        template.latest = raw.get("LatestVersionNumber")
        return template

    def add_version(self, raw: Raw) -> tuple[Template, int, bool]:
        """Registers a version; the flag tells whether it was new."""
        template = self._template(str(raw["LaunchTemplateId"]), str(raw.get("LaunchTemplateName") or ""))
        number = int(raw["VersionNumber"])
        if raw.get("DefaultVersion"):
            template.default = number
        key = (template.template_id, number)
        new = key not in self.image_of
        self.image_of[key] = str((raw.get("LaunchTemplateData") or {}).get("ImageId") or "")
        return template, number, new

    def _template(self, template_id: str, name: str) -> Template:
        if template_id not in self.by_id:
            self.by_id[template_id] = Template(template_id, name)
        return self.by_id[template_id]

    def template_id(self, spec: Spec) -> str | None:
        if spec.template_id:
            return spec.template_id if spec.template_id in self.by_id else None
        return next((t.template_id for t in self.by_id.values() if t.name == spec.template_name), None)

    def number(self, template_id: str, version: str) -> int | None:
        template = self.by_id[template_id]
        if version == "$Default":
            return template.default
        if version == "$Latest":
            return template.latest
        return int(version) if version.isascii() and version.isdigit() else None

    def locate(self, spec: Spec) -> tuple[str, int] | None:
        fetched = self.by_spec.get((spec.template_id or spec.template_name or "", spec.version))
        if fetched is not None:
            return fetched
        template_id = self.template_id(spec)
        number = self.number(template_id, spec.version) if template_id else None
        if template_id is None or number is None or (template_id, number) not in self.image_of:
            return None
        return template_id, number
