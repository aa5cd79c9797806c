"""Starting one copy (idempotent, found by provenance, recorded in the ledgers) and queueing copy requests.

The copy is recorded on the source's ledger item (source region) before CopyImage, and the new AMI's
item (target region) records it as a replica after: a crash in between leaves a generation recorded on
the source and on no copy, which the next plan starts again with the same ClientToken (EC2 answers with
the copy it made) and then records. No copy is made where either ledger table is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ami_janitor.aws.errors import AWS_ERRORS, error_text
from ami_janitor.aws.inventory.images import describe_image
from ami_janitor.aws.ledger import CHECK_PERMISSIONS, Ledger, LedgerFor, LedgerMissing, ledgers
from ami_janitor.core.model import Copy, Image, LedgerCopy
from ami_janitor.core.policy import (
    Policy,
)
from ami_janitor.core.replication import (
    CopyResult,
    _policy_change,
    copy_request,
    is_usable,
    ledger_copy,
    recorded_generation,
    source_record,
)

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_sqs import SQSClient
    from mypy_boto3_sqs.type_defs import SendMessageBatchRequestEntryTypeDef

    from ami_janitor.aws.clients import RegionClients


# What starting a copy calls in EC2: find the copy (destination), copy (destination; its
# TagSpecifications need ec2:CreateTags on the new AMI and snapshots).
EC2_PERMISSIONS: list[str] = sorted(["ec2:CopyImage", "ec2:CreateTags", "ec2:DescribeImages"])
# And in the ledgers of the source and the destination: check both tables are there, read the found
# copies' items, record the copy on the source and the replica on the new AMI.
LEDGER_PERMISSIONS: list[str] = sorted(["dynamodb:BatchGetItem", *CHECK_PERMISSIONS, "dynamodb:UpdateItem"])
PERMISSIONS: list[str] = sorted([*EC2_PERMISSIONS, *LEDGER_PERMISSIONS])

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


def find_copies(ec2: EC2Client, ledger: Ledger, source_image_id: str, region: str) -> list[Image]:
    """Every copy the janitor made of the source in the client's region, any state, with its ledger item.

    Found by what EC2 itself records (`source-image-id`), never by the provenance tag, which anyone may
    remove; a copy is one whose item in `ledger` (the region's) records it as the janitor's copy of
    that source.
    """
    answer = ec2.describe_images(
        Owners=["self"],
        IncludeDeprecated=True,
        IncludeDisabled=True,
        Filters=[{"Name": "source-image-id", "Values": [source_image_id]}],
    )
    images = [Image.from_api(region, dict(raw)) for raw in answer.get("Images") or []]
    items = ledger.read_items(i.image_id for i in images) if images else {}
    found = [i.model_copy(update={"ledger": items.get(i.image_id)}) for i in images]
    return [i for i in found if i.source_image_id == source_image_id]


def start_copy(
    clients_for: Callable[[str], RegionClients],
    copy: Copy,
    source: Image,
    policy: Policy,
    existing: Sequence[Image] | None = None,
    *,
    ledger_for: LedgerFor | None = None,
) -> CopyResult:
    """Start one copy unless it exists. Safe to repeat: a duplicate finds the copy by provenance, a retried
    request reuses its ClientToken. AWS errors, and a missing ledger table, are a failed result, never an
    exception. `source`: as EC2 describes it, with its ledger item. `existing`: the source's copies in
    the target region, when the caller has just read them (find_copies). `ledger_for`: each region's
    ledger (by default the policy's table)."""
    result = CopyResult.of(copy, "skipped")
    try:
        return _start(clients_for, copy, source, policy, result, existing, ledger_for)
    except (*AWS_ERRORS, ValueError, KeyError, LedgerMissing) as error:
        return result.model_copy(update={"status": "failed", "error": error_text(error)})


def _start(
    clients_for: Callable[[str], RegionClients],
    copy: Copy,
    source: Image,
    policy: Policy,
    result: CopyResult,
    existing: Sequence[Image] | None,
    ledger_for: LedgerFor | None,
) -> CopyResult:
    gone = _policy_change(copy, policy)
    if gone is not None:
        return result.model_copy(update={"detail": gone})
    request = copy_request(copy, source, policy)  # a request that cannot be made fails before any call
    ledger_for = ledger_for or ledgers(clients_for, policy.ledger)
    source_ledger, target_ledger = ledger_for(copy.source_region), ledger_for(copy.region)
    destination = clients_for(copy.region).ec2
    if existing is None:
        existing = find_copies(destination, target_ledger, copy.source_image_id, copy.region)
    usable = sorted((c for c in existing if is_usable(c)), key=lambda c: c.created, reverse=True)
    if usable:
        found = usable[0]
        _confirm_found(source_ledger, source, found)
        return result.model_copy(
            update={"status": "ok", "image_id": found.image_id, "detail": f"already copied ({found.state})"}
        )
    recorded = recorded_generation(source, copy.region)
    if copy.generation < recorded:
        # A newer generation was started since this request was made; its token must not be reused.
        return result.model_copy(update={"detail": f"superseded by generation {recorded}"})
    if any(c.replica_record and c.replica_record.generation == copy.generation for c in existing):
        # EC2 would answer this token with the failed copy: only the next generation can help.
        return result.model_copy(update={"detail": f"generation {copy.generation} failed already"})
    made = source_record(source, copy.region, copy.generation)
    taken_back = _take_back(clients_for(copy.region), target_ledger, made, copy, source, existing)
    if taken_back is not None:
        return result.model_copy(
            update={"status": "ok", "image_id": taken_back, "detail": "its copy's item written again"}
        )
    if made is not None and made.image_id:
        # The source's record names this generation's copy, which EC2 no longer lists (deregistered):
        # its token would be answered with that copy, reported started while none exists.
        return result.model_copy(
            update={
                "detail": f"generation {copy.generation}'s copy {made.image_id} was made and is gone: the next "
                f"run plans generation {copy.generation + 1}"
            }
        )
    if source.state != "available":
        return result.model_copy(update={"detail": f"source is {source.state}: not copied"})
    if copy.region == copy.source_region and source.encrypted:
        return result.model_copy(update={"detail": "source is encrypted already: no copy in its own region"})
    # Both tables first: no copy the ledgers could not record.
    source_ledger.require()
    if copy.region != copy.source_region:
        target_ledger.require()
    record = ledger_copy(copy, source, datetime.now(UTC))
    # Recorded before the copy starts: this generation is never planned anew, only finished with its
    # token ("already-recorded": an earlier attempt of this same copy).
    source_ledger.record_copy(record)
    answer = destination.copy_image(**request)
    image_id = str(answer.get("ImageId") or "")
    if not image_id:
        # Nothing to record (an item keyed by no id): failed, tried again with the same token, which
        # EC2 answers with the copy it made, if it made one.
        raise ValueError(f"CopyImage to {copy.region} answered no image id")
    if target_ledger.record_replica(image_id, record) == "already-recorded":
        raise ValueError(f"the ledger of {copy.region} records {image_id} as another copy")
    detail = f"copy started (generation {copy.generation})"
    try:
        source_ledger.confirm_copy(record, image_id)
    except AWS_ERRORS as error:
        # The copy is made and its own item records it: only a retired copy's expired item, long after,
        # would be taken for a generation never made (its token tried once more, the next one after).
        detail += f"; its id not recorded on the source's item: {error_text(error)}"
    return result.model_copy(update={"status": "ok", "started": True, "image_id": image_id, "detail": detail})


def _confirm_found(source_ledger: Ledger, source: Image, found: Image) -> None:
    """A copy found made whose source's record lacks its id (a run stopped between the copy's item and
    the confirmation): the id is written now, as confirm_copy would have. Best effort: without it the
    old token is tried once more, long after, when the copy's item has expired."""
    replica = found.replica_record
    record = source_record(source, found.region, replica.generation) if replica is not None else None
    if record is None or record.image_id is not None:
        return
    try:
        source_ledger.confirm_copy(record, found.image_id)
    except AWS_ERRORS:
        return


def _take_back(
    clients: RegionClients,
    target_ledger: Ledger,
    record: LedgerCopy | None,
    copy: Copy,
    source: Image,
    existing: Sequence[Image],
) -> str | None:
    """The copy of this generation the source's record (`record`) names as made, which EC2 still lists
    as a copy of the source while the target's ledger no longer has its item (the table restored or
    made again): its item is written again, and its id returned. Never CopyImage for it: EC2 may have
    forgotten the old token, or would refuse it (IdempotentParameterMismatch) once the request changed.
    None where the record names no copy, or EC2 no longer lists it (the next generation's case)."""
    made = record.image_id if record is not None else None
    if record is None or made is None or any(c.image_id == made for c in existing):
        return None
    listed = describe_image(clients, made)
    if listed is None or listed.copied_from != source.image_id:
        return None
    target_ledger.require()
    if target_ledger.record_replica(made, record) == "already-recorded":
        raise ValueError(f"the ledger of {copy.region} records {made} as another copy")
    return made


def enqueue_copies(sqs_client: SQSClient, queue_url: str, copies: Sequence[Copy]) -> int:
    """Queue the copy requests (one message each, ten per call); returns how many were queued.

    An entry SQS refuses for a reason of its own (not the sender's fault) is sent once more; what is
    still refused, or a call that fails, is not queued and not raised: the next reconcile plans it again.
    """
    return len(_send_bodies(sqs_client, queue_url, [copy.model_dump_json() for copy in copies]))


# The replication worker's grant to send again (SendMessageBatch is authorized as sqs:SendMessage) comes
# with its queue, as the senders' grants do (infra.replication: the stack grants sqs actions on its own
# queues).
def send_again(
    sqs_client: SQSClient, queue_url: str, bodies: Sequence[str], *, delay_seconds: int
) -> set[int]:
    """Send the message bodies again, each as a new message delivered after `delay_seconds` (ten per
    call, as enqueue_copies); returns the positions in `bodies` of those SQS took. A new message's
    receive count starts afresh. Not raised: a body not sent again is the caller's to keep."""
    return _send_bodies(sqs_client, queue_url, bodies, delay_seconds)


def _send_bodies(
    sqs_client: SQSClient, queue_url: str, bodies: Sequence[str], delay_seconds: int | None = None
) -> set[int]:
    """SendMessageBatch of the bodies, ten per call; an entry refused not for the sender's fault is sent
    once more. The positions in `bodies` of the messages sent."""
    sent: set[int] = set()
    for start in range(0, len(bodies), SEND_MESSAGE_BATCH_MAX):
        entries: list[SendMessageBatchRequestEntryTypeDef] = []
        for n, body in enumerate(bodies[start : start + SEND_MESSAGE_BATCH_MAX]):
            entry: SendMessageBatchRequestEntryTypeDef = {"Id": str(n), "MessageBody": body}
            if delay_seconds is not None:
                entry["DelaySeconds"] = delay_seconds
            entries.append(entry)
        for _attempt in range(2):
            try:
                answer = sqs_client.send_message_batch(QueueUrl=queue_url, Entries=entries)
            except AWS_ERRORS:
                break
            sent.update(start + int(done["Id"]) for done in answer.get("Successful") or [])
            again = {f["Id"] for f in answer.get("Failed") or [] if not f.get("SenderFault")}
            entries = [entry for entry in entries if entry["Id"] in again]
            if not entries:
                break
    return sent
