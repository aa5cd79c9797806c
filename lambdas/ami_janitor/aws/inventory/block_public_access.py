"""EC2 image block public access: where it is off, anyone who may call ModifyImageAttribute on an AMI
can make it public, and the plan says so.

Optional: where EC2 answers explicitly that the operation is not offered here, nothing is said; any
other failure skips the region, like every other source.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ami_janitor.aws.inventory.reading import optional

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

PERMISSIONS: list[str] = ["ec2:GetImageBlockPublicAccessState"]

UNBLOCKED = "unblocked"


def read_block_public_access(ec2: EC2Client, region: str) -> list[str]:
    """A note when image block public access is off in the region; none when it is on or not offered."""
    state = optional(
        "ec2:GetImageBlockPublicAccessState",
        lambda: str(ec2.get_image_block_public_access_state()["ImageBlockPublicAccessState"]),
    )
    if state != UNBLOCKED:
        return []
    return [
        "image block public access is off: anyone who may call ModifyImageAttribute can make an AMI "
        f"public; `aws ec2 enable-image-block-public-access --region {region} "
        "--image-block-public-access-state block-new-sharing`"
    ]
