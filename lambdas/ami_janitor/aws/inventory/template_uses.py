"""Resources launching from a launch template (Auto Scaling groups, fleets, Batch): each keeps the
image of the version it names, read if no listing covered it (a pinned old version, a template created
since the listing). A Batch compute environment naming `$Default` or `$Latest` keeps every version's
image (batch_version_claims)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from ami_janitor.aws.errors import error_code
from ami_janitor.aws.inventory import batch
from ami_janitor.aws.inventory.claims import Claim, Spec, TemplateUse, claim
from ami_janitor.aws.inventory.launch_templates import Mode, read_versions
from ami_janitor.aws.inventory.reading import Raw, chunks, source
from ami_janitor.aws.inventory.template_versions import Templates

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

PERMISSIONS: list[str] = ["ec2:DescribeLaunchTemplateVersions"]


def read_missing_versions(ec2: EC2Client, templates: Templates, uses: Iterable[TemplateUse]) -> Templates:
    """A copy of `templates` with the versions the uses name and no listing loaded."""
    templates = templates.copy()
    numbers: dict[str, set[int]] = {}
    unknown: set[Spec] = set()
    for spec in (use.spec for use in uses):
        if templates.locate(spec) is not None:
            continue
        template_id = templates.template_id(spec)
        number = templates.number(template_id, spec.version) if template_id else None
        if template_id is not None and number is not None:
            numbers.setdefault(template_id, set()).add(number)
        else:
            unknown.add(spec)
    with source("ec2:DescribeLaunchTemplateVersions"):
        for template_id, wanted in sorted(numbers.items()):
            for raw in _fetch(ec2, {"LaunchTemplateId": template_id}, [str(n) for n in sorted(wanted)]):
                templates.add_version(raw)
        for spec in sorted(unknown, key=lambda s: (s.template_id or "", s.template_name or "", s.version)):
            _fetch_unknown(ec2, templates, spec)
    return templates


def _fetch_unknown(ec2: EC2Client, templates: Templates, spec: Spec) -> None:
    # A template absent from the listing (created meanwhile, or gone): ask for exactly what the spec says.
    for raw in _fetch(ec2, _where(spec), [spec.version]):
        template, number, _ = templates.add_version(raw)
        templates.by_spec[(spec.template_id or spec.template_name or "", spec.version)] = (
            template.template_id,
            number,
        )


def _where(spec: Spec) -> dict[str, str]:
    """The template a spec names, as DescribeLaunchTemplateVersions asks for it: by id, else by name."""
    if spec.template_id:
        return {"LaunchTemplateId": spec.template_id}
    return {"LaunchTemplateName": spec.template_name or ""}


def _fetch(ec2: EC2Client, where: dict[str, Any], versions: Sequence[str]) -> list[Raw]:
    """The versions asked for; a missing template or version is simply absent from the answer."""
    raws: list[Raw] = []
    for chunk in chunks(versions, 200):
        try:
            raws += read_versions(ec2, None, Versions=chunk, **where)
        except ClientError as error:
            if not error_code(error).startswith("InvalidLaunchTemplate"):
                raise
            # One missing version fails the whole call: ask for the others one by one.
            if len(chunk) > 1:
                raws += [raw for version in chunk for raw in _fetch(ec2, where, [version])]
    return raws


def template_claims(templates: Templates, uses: Iterable[TemplateUse]) -> tuple[list[Claim], list[str]]:
    """Each use's claim on the image of the version it names, and a note for each use of a version
    that does not exist."""
    claims: list[Claim] = []
    notes: list[str] = []
    for use in uses:
        located = templates.locate(use.spec)
        if located is None:
            notes.append(f"{use.subject} names launch template {use.spec.label}, which does not exist")
            continue
        template_id, number = located
        subject = f"{use.subject} (launch template {template_id} version {number})"
        claims += claim(templates.image_of[located], use.kind, use.resource_id, subject)
    return claims, notes


# Batch resolves `$Default` and `$Latest` when a compute environment is made or its infrastructure
# updated, and launches from that version's image until the next such update (unless the environment
# says updateToLatestImageVersion): the version a template calls default or latest today need not be
# the one its instances launch from.
_RESOLVED_WHEN_MADE = ("$Default", "$Latest")


def batch_version_claims(ec2: EC2Client, mode: Mode, uses: Iterable[TemplateUse]) -> list[Claim]:
    """The claims of each Batch compute environment naming a template's `$Default` or `$Latest` on the
    image of every version of that template: it may launch from any of them. With `all`, the listing
    read and claimed every version already: no call."""
    if mode == "all":
        return []
    symbolic = {use for use in uses if use.kind == batch.KIND and use.spec.version in _RESOLVED_WHEN_MADE}
    claims: list[Claim] = []
    read: dict[tuple[str, str], list[Raw]] = {}  # each template once, however many environments name it
    with source("ec2:DescribeLaunchTemplateVersions"):
        for use in sorted(symbolic, key=lambda u: (u.resource_id, u.subject, u.spec.label)):
            spec = use.spec
            where = _where(spec)
            template = next(iter(where.items()))
            if template not in read:
                try:
                    read[template] = list(read_versions(ec2, 200, **where))
                except ClientError as error:
                    if not error_code(error).startswith("InvalidLaunchTemplate"):
                        raise
                    read[template] = []  # gone: template_claims notes it
            for raw in read[template]:
                subject = (
                    f"{use.subject} (launch template {raw.get('LaunchTemplateId')} version "
                    f"{raw.get('VersionNumber')}: Batch launches from the version {spec.version} was when "
                    "the environment was made or last updated)"
                )
                image = (raw.get("LaunchTemplateData") or {}).get("ImageId")
                claims += claim(image, use.kind, use.resource_id, subject)
    return claims
