"""The policy's Latest pointers: the SSM parameters whose value names a family's Latest AMI.

Their values go to the inventory's `parameters` and are never references: the planner decides Latest
from them after this run's rotation, not from the old value.
"""

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, NamedTuple

from ami_janitor.aws.inventory.get_parameters import get_parameters
from ami_janitor.aws.inventory.reading import source
from ami_janitor.core.model import Image
from ami_janitor.core.policy import Policy

if TYPE_CHECKING:
    from mypy_boto3_ssm import SSMClient

PERMISSIONS: list[str] = ["ssm:GetParameters"]


# EC2's architectures (DescribeImages' ArchitectureValues): what `{arch}` in a pointer can become.
ARCHITECTURES = ("i386", "x86_64", "arm64", "x86_64_mac", "arm64_mac")


class Pointers(NamedTuple):
    """The pointer names to read in this region ({arch} filled in from the families' images), every
    name a pointer of the policy can have ({arch} filled in with each of EC2's architectures), and the
    region's own AMIs (a pointer naming one of them is the rotation's; one naming another account's AMI
    is a use of it, as any parameter's)."""

    names: frozenset[str]
    owned: frozenset[str]
    own_images: frozenset[str] = frozenset()

    @classmethod
    def of(cls, policy: Policy, images: Iterable[Image]) -> "Pointers":
        images = tuple(images)
        names: set[str] = set()
        owned: set[str] = set()
        for family in policy.families:
            template = family.latest.ssm_parameter if family.latest else None
            if template is None:
                continue
            if "{arch}" not in template:
                names.add(template)
                owned.add(template)
                continue
            # Exact names, never a pattern: `/ami/web/{arch}/latest` owns `/ami/web/arm64/latest`, not
            # a user's `/ami/web/prod/latest`, whose value stays a reference.
            owned.update(template.replace("{arch}", arch) for arch in ARCHITECTURES)
            names.update(
                template.replace("{arch}", image.architecture)
                for image in images
                if family.match.matches(image.name, image.tags)
            )
        return cls(frozenset(names), frozenset(owned | names), frozenset(i.image_id for i in images))

    def owns(self, name: str) -> bool:
        return name in self.owned


def read_pointer_values(ssm: "SSMClient", pointers: Pointers, scanned: Mapping[str, str]) -> dict[str, str]:
    """Pointer name -> value, sorted: from the parameter scan where it saw them (`scanned`), else read
    (a SecureString pointer is left out). Without the whitespace around it (`put-parameter --value
    file://ami.txt` writes a newline): the AMI it names is the one the claims leave to the planner as
    Latest (parameters.parameter_claims), so the planner must see that AMI there too."""
    values = {name: scanned[name].strip() for name in pointers.names if name in scanned}
    missing = sorted(pointers.names - values.keys())
    with source("ssm:GetParameters"):
        for name, parameter in get_parameters(ssm, missing).items():
            if parameter.get("Type") != "SecureString":
                values[name] = str(parameter.get("Value") or "").strip()
    return dict(sorted(values.items()))
