"""EC2's service model cut to the operations the janitor calls, for the SDK to load instead of its own.

botocore parses EC2's whole model (830 operations, 3.7 MB of JSON) when an EC2 client is made: about
90 ms of a function's cold start, for the 21 operations the janitor calls. The cut keeps every
operation the package names and every shape they reach, unchanged but for their documentation; it is found through a
search path of the sessions the janitor makes itself (`aws.clients`), ahead of botocore's own data and
behind a user's (~/.aws/models), and everything else (paginators, waiters, endpoint rules) still comes
from botocore. `python -m ami_janitor.aws.models` writes it again from the installed botocore (after an
upgrade, or when the janitor calls one more operation: add it to EC2_OPERATIONS).
"""

from __future__ import annotations

from pathlib import Path

DATA_PATH = Path(__file__).resolve().parent
EC2_API_VERSION = "2016-11-15"
EC2_MODEL = DATA_PATH / "ec2" / EC2_API_VERSION / "service-2.json"

EC2_OPERATIONS = (
    "CopyImage",
    "CreateImage",
    "CreateTags",
    "DeleteSnapshot",
    "DeleteTags",
    "DeregisterImage",
    "DescribeFleets",
    "DescribeImageAttribute",
    "DescribeImageReferences",
    "DescribeImages",
    "DescribeInstances",
    "DescribeLaunchTemplateVersions",
    "DescribeLaunchTemplates",
    "DescribeSnapshots",
    "DescribeSpotFleetRequests",
    "DisableImage",
    "DisableImageDeprecation",
    "EnableImage",
    "EnableImageDeprecation",
    "GetImageBlockPublicAccessState",
    "ModifyImageAttribute",
    "RegisterImage",  # not called: named in aws/pacing.py's table, and the cut keeps what the package names
)
