"""Launch template versions (DescribeLaunchTemplates, DescribeLaunchTemplateVersions): each version
that names an AMI keeps it. `references.launch_template_versions` says which versions count: all, the
default and latest only, or the N newest (and the default)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

from ami_janitor.aws.inventory.claims import Claim, claim
from ami_janitor.aws.inventory.reading import Raw, items, source
from ami_janitor.aws.inventory.template_versions import Template, Templates

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

PERMISSIONS: list[str] = ["ec2:DescribeLaunchTemplateVersions", "ec2:DescribeLaunchTemplates"]

Mode = Literal["all", "default-and-latest"] | int


def read_versions(ec2: EC2Client, page_size: int | None, **params: Any) -> Iterator[Raw]:
    """Every launch template version the parameters ask for (None: no page size, as with Versions)."""
    return items(ec2, "describe_launch_template_versions", "LaunchTemplateVersions", page_size, **params)


def read_launch_templates(ec2: EC2Client, mode: Mode) -> tuple[Templates, list[Claim]]:
    """The versions the mode counts, and the claim each makes on the image it names."""
    templates = Templates()
    if mode == "default-and-latest":
        return templates, _default_and_latest(ec2, templates)
    with source("ec2:DescribeLaunchTemplates"):
        raws = items(ec2, "describe_launch_templates", "LaunchTemplates", 200)
        listed = [templates.add_template(raw) for raw in raws]
    with source("ec2:DescribeLaunchTemplateVersions"):
        if mode == "all":
            return templates, [
                each
                for template in listed
                for each in _register(
                    templates, read_versions(ec2, 200, LaunchTemplateId=template.template_id)
                )
            ]
        return templates, _newest(ec2, templates, listed, int(mode))


def _register(templates: Templates, raws: Iterable[Raw]) -> list[Claim]:
    """Adds the versions to `templates`; the claims of those it did not hold yet."""
    claims: list[Claim] = []
    for raw in raws:
        template, number, new = templates.add_version(raw)
        if new:
            image = templates.image_of[(template.template_id, number)]
            subject = f"launch template {template.template_id} ({template.name}) version {number}"
            claims += claim(image, "launch-template", template.template_id, subject)
    return claims


def _default_and_latest(ec2: EC2Client, templates: Templates) -> list[Claim]:
    # Without a template id the API lists $Latest and $Default of every template in one paginated call.
    with source("ec2:DescribeLaunchTemplateVersions"):
        claims = _register(templates, read_versions(ec2, 200, Versions=["$Latest", "$Default"]))
    for template_id, number in templates.image_of:
        template = templates.by_id[template_id]
        template.latest = max(template.latest or 0, number)
    return claims


def _newest(ec2: EC2Client, templates: Templates, listed: list[Template], count: int) -> list[Claim]:
    """The `count` newest existing versions of each listed template, and each one's default."""
    claims: list[Claim] = []
    for template in listed:
        claims += _register(templates, _newest_versions(ec2, template, count))
    if any(t.default is not None and (t.template_id, t.default) not in templates.image_of for t in listed):
        # One account-wide listing beats one call per template whose default is old.
        claims += _register(templates, read_versions(ec2, 200, Versions=["$Default"]))
    return claims


def _newest_versions(ec2: EC2Client, template: Template, count: int) -> list[Raw]:
    latest = template.latest or 0
    if latest < 1:
        return []
    low = max(1, latest - count + 1)
    newest, default = _version_range(ec2, template, low, latest, count)
    if len(newest) < count and low > 1:
        # Some of the newest versions were deleted: reach further back, once.
        older, older_default = _version_range(ec2, template, 1, low - 1, count - len(newest))
        return newest + default + older + older_default
    return newest + default


def _version_range(
    ec2: EC2Client, template: Template, low: int, high: int, keep: int
) -> tuple[list[Raw], list[Raw]]:
    """The `keep` newest versions numbered low..high (above `high` too where it is the latest the listing
    said: a version made since counts), and the default if it came along in the answer (kept too, rather
    than asked for again). EC2's reference calls MinVersion "the version number after which" and
    MaxVersion "the version number up to which": each bound is asked one wider than needed, and the
    answer cut here, so that neither end is missed whichever way EC2 reads them (one call either way)."""
    latest = high >= (template.latest or 0)
    bounds = {"MinVersion": str(low - 1)} if low > 1 else {}
    if not latest:
        bounds["MaxVersion"] = str(high + 1)
    answer = list(read_versions(ec2, 200, LaunchTemplateId=template.template_id, **bounds))
    raws = [
        raw
        for raw in answer
        if low <= int(raw["VersionNumber"]) and (latest or int(raw["VersionNumber"]) <= high)
    ]
    newest = sorted(raws, key=lambda raw: int(raw["VersionNumber"]), reverse=True)[:keep]
    return newest, [raw for raw in answer if raw.get("DefaultVersion") and raw not in newest]
