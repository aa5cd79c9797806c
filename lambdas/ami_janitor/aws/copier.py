"""Starting one copy (idempotent, found by provenance) and queueing copy requests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ami_janitor.aws.errors import AWS_ERRORS, error_text
from ami_janitor.core.model import Copy, Image
from ami_janitor.core.policy import (
    SOURCE_IMAGE_TAG,
    Policy,
)
from ami_janitor.core.replication import (
    CopyResult,
    _policy_change,
    copy_request,
    generation_tag,
    is_usable,
    recorded_generation,
)

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_sqs import SQSClient
    from mypy_boto3_sqs.type_defs import SendMessageBatchRequestEntryTypeDef

    from ami_janitor.aws.clients import RegionClients


# What starting a copy calls: find the copy by provenance (destination), record the generation
# (source), copy (destination; its TagSpecifications need ec2:CreateTags on the new AMI and snapshots).
PERMISSIONS: list[str] = sorted(["ec2:CopyImage", "ec2:CreateTags", "ec2:DescribeImages"])

# What EC2 does with a customer managed key on the caller's behalf while it copies and encrypts the
# snapshots (Amazon EBS encryption requirements: CreateGrant, Decrypt, DescribeKey,
# GenerateDataKeyWithoutPlaintext, ReEncrypt*). Granted by the deploy on the configured key ARNs only.
KMS_PERMISSIONS: list[str] = sorted(
    [
        "kms:CreateGrant",
        "kms:Decrypt",
        "kms:DescribeKey",
        "kms:GenerateDataKeyWithoutPlaintext",
        "kms:ReEncryptFrom",
        "kms:ReEncryptTo",
    ]
)

SEND_MESSAGE_BATCH_MAX = 10


def find_copies(ec2: EC2Client, source_image_id: str, region: str) -> list[Image]:
    """Every copy of the source in the client's region, any state, found by its provenance tag."""
    answer = ec2.describe_images(
        Owners=["self"],
        IncludeDeprecated=True,
        IncludeDisabled=True,
        Filters=[{"Name": f"tag:{SOURCE_IMAGE_TAG}", "Values": [source_image_id]}],
    )
    return [Image.from_api(region, dict(raw)) for raw in answer.get("Images") or []]


def start_copy(
    clients_for: Callable[[str], RegionClients],
    copy: Copy,
    source: Image,
    policy: Policy,
    existing: Sequence[Image] | None = None,
) -> CopyResult:
    """Start one copy unless it exists. Safe to repeat: a duplicate finds the copy by provenance, a retried
    request reuses its ClientToken. AWS errors are a failed result, never an exception. `existing`: the
    source's copies in the target region, when the caller has just read them (find_copies)."""
    result = CopyResult.of(copy, "skipped")
    try:
        return _start(clients_for, copy, source, policy, result, existing)
    except (*AWS_ERRORS, ValueError, KeyError) as error:
        return result.model_copy(update={"status": "failed", "error": error_text(error)})


def _start(
    clients_for: Callable[[str], RegionClients],
    copy: Copy,
    source: Image,
    policy: Policy,
    result: CopyResult,
    existing: Sequence[Image] | None,
) -> CopyResult:
    gone = _policy_change(copy, policy)
    if gone is not None:
        return result.model_copy(update={"detail": gone})
    request = copy_request(copy, source, policy)  # a request that cannot be made fails before any call
    destination = clients_for(copy.region).ec2
    if existing is None:
        existing = find_copies(destination, copy.source_image_id, copy.region)
    usable = sorted((c for c in existing if is_usable(c)), key=lambda c: c.created, reverse=True)
    if usable:
        found = usable[0]
        return result.model_copy(
            update={"status": "ok", "image_id": found.image_id, "detail": f"already copied ({found.state})"}
        )
    recorded = recorded_generation(source, copy.region)
    if copy.generation < recorded:
        # A newer generation was started since this request was made; its token must not be reused.
        return result.model_copy(update={"detail": f"superseded by generation {recorded}"})
    if any(recorded_generation(c, copy.region) == copy.generation for c in existing):
        # EC2 would answer this token with the failed copy: only the next generation can help.
        return result.model_copy(update={"detail": f"generation {copy.generation} failed already"})
    if source.state != "available":
        return result.model_copy(update={"detail": f"source is {source.state}: not copied"})
    if copy.region == copy.source_region and source.encrypted:
        return result.model_copy(update={"detail": "source is encrypted already: no copy in its own region"})
    if copy.generation > recorded:
        # Recorded before the copy starts: whatever happens next, this generation is never used again.
        clients_for(copy.source_region).ec2.create_tags(
            Resources=[copy.source_image_id],
            Tags=[{"Key": generation_tag(copy.region), "Value": str(copy.generation)}],
        )
    answer = destination.copy_image(**request)
    return result.model_copy(
        update={
            "status": "ok",
            "started": True,
            "image_id": answer["ImageId"],
            "detail": f"copy started (generation {copy.generation})",
        }
    )


def enqueue_copies(sqs_client: SQSClient, queue_url: str, copies: Sequence[Copy]) -> int:
    """Queue the copy requests (one message each, ten per call); returns how many were queued.

    An entry SQS refuses for a reason of its own (not the sender's fault) is sent once more; what is
    still refused, or a call that fails, is not queued and not raised: the next reconcile plans it again.
    """
    sent = 0
    for start in range(0, len(copies), SEND_MESSAGE_BATCH_MAX):
        entries: list[SendMessageBatchRequestEntryTypeDef] = [
            {"Id": str(n), "MessageBody": copy.model_dump_json()}
            for n, copy in enumerate(copies[start : start + SEND_MESSAGE_BATCH_MAX])
        ]
        for _attempt in range(2):
            try:
                answer = sqs_client.send_message_batch(QueueUrl=queue_url, Entries=entries)
            except AWS_ERRORS:
                break
            sent += len(answer.get("Successful") or [])
            again = {f["Id"] for f in answer.get("Failed") or [] if not f.get("SenderFault")}
            entries = [entry for entry in entries if entry["Id"] in again]
            if not entries:
                break
    return sent
