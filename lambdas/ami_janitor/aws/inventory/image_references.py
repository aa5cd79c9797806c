"""DescribeImageReferences: what it finds beyond the other sources (Image Builder recipes, mostly).
Asked only about the AMIs a plan acts on or runs a clock on (10 ids a call), after the plan chose them.

Optional: where EC2 answers explicitly that the operation is not offered here, the other sources stand
alone (with a note); any other failure skips the region.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence, Set
from typing import TYPE_CHECKING

from ami_janitor.aws.inventory.pointers import Pointers
from ami_janitor.aws.inventory.reading import Raw, chunks, items, optional
from ami_janitor.core.model import Reference

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

PERMISSIONS: list[str] = ["ec2:DescribeImageReferences"]
# With IncludeAllResourceTypes the API looks at each resource type with the caller's own permissions
# (what AWS's AmazonEC2ImageReferencesAccessPolicy grants): without these the call is refused and the
# region is skipped, or the slice is not run. Every role that calls it needs them all, even where its
# other calls do not.
DEPENDENCIES: list[str] = [
    "ec2:DescribeInstances",
    "ec2:DescribeLaunchTemplateVersions",
    "ec2:DescribeLaunchTemplates",
    "imagebuilder:GetContainerRecipe",
    "imagebuilder:ListContainerRecipes",
    "imagebuilder:ListImageRecipes",
    "ssm:DescribeParameters",
    "ssm:GetParameters",
]

_BATCH = 10  # DescribeImageReferences takes at most 10 image ids


def read_image_references(
    ec2: EC2Client,
    region: str,
    image_ids: Sequence[str],
    *,
    known: Iterable[Reference],
    pointers: Pointers,
    live_instances: Set[str],
    parameter_names: Set[str],
) -> tuple[list[Reference], list[str]]:
    """The references to `image_ids` (the families' AMIs) that `known` lacks, and a note when the API is
    not offered here. An instance counts only if live; a Latest pointer never counts; `parameter_names`
    (the scan's) tell how a parameter is spelled."""
    if not image_ids:
        return [], []
    answer = optional("ec2:DescribeImageReferences", lambda: list(_items(ec2, image_ids)))
    if answer is None:
        note = f"DescribeImageReferences is not available in {region}; the other reference sources were used"
        return [], [note]
    seen = {(r.image_id, r.kind, r.resource_id) for r in known}
    references: list[Reference] = []
    for item in answer:
        resource_type = str(item.get("ResourceType") or "")
        kind, resource_id = _target(resource_type, str(item.get("Arn") or ""), parameter_names)
        image_id = str(item.get("ImageId") or "")
        if kind == "instance" and resource_id not in live_instances:
            continue  # the API also reports terminated instances
        key = (image_id, kind, resource_id)
        if key in seen or (kind == "ssm-parameter" and pointers.owns(resource_id)):
            continue
        seen.add(key)
        verb = "used by" if kind == "instance" else "referenced by"
        detail = f"{verb} {item.get('ResourceType')} {resource_id} (DescribeImageReferences)"
        references.append(Reference(image_id=image_id, kind=kind, resource_id=resource_id, detail=detail))
    return references, []


def sort_references(references: Iterable[Reference]) -> tuple[Reference, ...]:
    return tuple(sorted(references, key=lambda r: (r.image_id, r.kind, r.resource_id, r.detail)))


def _items(ec2: EC2Client, image_ids: Sequence[str]) -> Iterator[Raw]:
    for batch in chunks(image_ids, _BATCH):
        # No MaxResults: the API documents no maximum, and a wrong guess would fail every region.
        yield from items(
            ec2,
            "describe_image_references",
            "ImageReferences",
            None,
            ImageIds=batch,
            IncludeAllResourceTypes=True,
        )


def _target(resource_type: str, arn: str, parameter_names: Set[str]) -> tuple[str, str]:
    """(kind, resource id) of an item, named like the other sources name them."""
    resource = arn.split(":", 5)[5] if arn.count(":") >= 5 else arn
    path = resource.split("/", 1)[1] if "/" in resource else resource
    if resource_type == "ec2:Instance":
        return "instance", path
    if resource_type == "ec2:LaunchTemplate":
        return "launch-template", path.split("/", 1)[0]
    if resource_type == "ssm:Parameter":
        # An ARN drops a name's leading '/': use the name the parameter scan saw.
        if path in parameter_names and f"/{path}" not in parameter_names:
            return "ssm-parameter", path
        return "ssm-parameter", f"/{path}"
    if resource_type.startswith("imagebuilder:"):
        return "image-builder-recipe", arn
    return resource_type, arn
