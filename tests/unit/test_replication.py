"""Replication planning, the CopyImage request, the failed-copy retry and the queue message (no AWS)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

from ami_janitor.aws.copier import enqueue_copies
from ami_janitor.core.model import (
    Copy,
    Image,
    LedgerCopy,
    LedgerItem,
    LedgerStage,
    LedgerView,
    RegionInventory,
    iso,
)
from ami_janitor.core.planner import build_groups, plan
from ami_janitor.core.policy import (
    CANDIDATE_TAG,
    COPY_GENERATION_TAG_PREFIX,
    SOURCE_CREATED_TAG,
    SOURCE_IMAGE_TAG,
    SOURCE_REGION_TAG,
    Policy,
)
from ami_janitor.core.replication import (
    MAX_COPY_GENERATIONS,
    BadCopyMessage,
    RefusedCopy,
    client_token,
    copy_from_message,
    copy_problems,
    copy_request,
    handle_failed_replica,
    plan_copies,
    plan_replication,
    rebuild_copy,
)
from builders import NOW, copied, image, inventory, policy

US, EU, WEST = "us-east-1", "eu-west-1", "us-west-2"
KEY_US = "arn:aws:kms:us-east-1:111122223333:key/us"
KEY_EU = "arn:aws:kms:eu-west-1:111122223333:key/eu"


def replicating(*targets: dict[str, Any], **family: Any) -> Policy:
    return policy({"replicate": list(targets), "latest": {"tag": "Latest"}, **family}, regions=[US])


EU_ONLY = replicating({"region": EU, "kms_key_id": KEY_EU})


def replica(
    source: Image, region: str = EU, state: str = "available", generation: int = 1, **fields: Any
) -> Image:
    """A copy the janitor made: EC2 names its source, its ledger item records it (the tags mirror it)."""
    tags = {
        SOURCE_IMAGE_TAG: source.image_id,
        SOURCE_REGION_TAG: source.region,
        SOURCE_CREATED_TAG: iso(source.created) or "",
        COPY_GENERATION_TAG_PREFIX + region: str(generation),
    }
    made = image(
        days_old=0,
        name=source.name,
        region=region,
        state=state,
        tags=tags,
        copied_from=source.image_id,
        copied_from_region=source.region,
        **fields,
    )
    record = copy_record(source, region, generation, image_id=made.image_id)
    return made.model_copy(update={"ledger": LedgerItem(image_id=made.image_id, replica=record)})


def copy_record(source: Image, region: str, generation: int, image_id: str | None = None) -> LedgerCopy:
    """The ledger's record of a copy of `source` to `region` (the source's, or with `image_id` the replica's)."""
    return LedgerCopy(
        source_image_id=source.image_id,
        source_region=source.region,
        region=region,
        generation=generation,
        token=f"token-{generation}",
        image_id=image_id,
        source_created=source.created,
    )


def started(source: Image, *generations: int, region: str = EU) -> Image:
    """The source with the copies to `region` its ledger item records (before each CopyImage)."""
    copies = tuple(copy_record(source, region, g) for g in generations)
    return source.model_copy(update={"ledger": LedgerItem(image_id=source.image_id, copies=copies)})


def retired(copy: Image) -> Image:
    """The copy as the janitor leaves it once retired: gone from EC2, its item records the deregistration."""
    assert copy.ledger is not None
    done = NOW - timedelta(days=1)
    item = copy.ledger.model_copy(
        update={
            "first_candidate": NOW - timedelta(days=15),
            "stages": {"deregister": LedgerStage(at=done, confirmed=done)},
            "deregistered": done,
        }
    )
    return copy.model_copy(update={"state": "deregistered", "ledger": item})


def ledger_of(*copies: Image) -> LedgerView:
    """A target region's ledger holding the items of `copies` (those gone from EC2 too)."""
    return LedgerView(table="ami-janitor-ledger", items={c.image_id: c.ledger for c in copies if c.ledger})


def pairs(copies: list[Copy]) -> list[tuple[str, str, int]]:
    return [(c.source_image_id, c.region, c.generation) for c in copies]


# ---- plan_copies --------------------------------------------------------------------------------


def test_the_keep_latest_newest_available_sources_are_copied_newest_first() -> None:
    sources = [image(days_old=d) for d in (10, 20, 30, 40)]
    pending = image(days_old=1, state="pending")
    failed = image(days_old=2, state="failed")
    copies = plan_copies([inventory(*sources, pending, failed), inventory(region=EU)], EU_ONLY, NOW)
    assert pairs(copies) == [(sources[0].image_id, EU, 1), (sources[1].image_id, EU, 1)]
    assert copies[0] == Copy(
        family="app", source_image_id=sources[0].image_id, source_region=US, region=EU, kms_key_id=KEY_EU
    )


def test_the_latest_of_the_target_group_is_copied_even_when_older_than_its_keep_latest() -> None:
    # The target's two newest AMIs are deprecated: they still count toward keep-N, but its Latest is the
    # copy of the newest source.
    past = NOW - timedelta(days=1)
    deprecated = [image(days_old=d, region=EU, deprecation_time=past) for d in (10, 20)]
    latest, old = image(days_old=30), image(days_old=40)
    copies = plan_copies([inventory(latest, old), inventory(*deprecated, region=EU)], EU_ONLY, NOW)
    assert [c.source_image_id for c in copies] == [latest.image_id]


def test_a_copy_carries_no_deprecation_so_a_deprecated_source_ranks_as_it_is_there() -> None:
    # The source region's two newest are deprecated; their copies are not, so the copy of the first is
    # the target's Latest and a copy of the source region's Latest would be a candidate there.
    past = NOW - timedelta(days=1)
    deprecated = [image(days_old=d, deprecation_time=past) for d in (10, 20)]
    latest, old = image(days_old=30), image(days_old=40)
    copies = plan_copies([inventory(*deprecated, latest, old), inventory(region=EU)], EU_ONLY, NOW)
    assert [c.source_image_id for c in copies] == [deprecated[0].image_id, deprecated[1].image_id]


def test_a_copy_in_any_state_but_failed_counts_as_made() -> None:
    sources = [image(days_old=d) for d in (10, 20, 30)]
    target = inventory(
        replica(sources[0], state="pending"),
        replica(sources[1], state="disabled"),
        replica(sources[2], state="available"),
        region=EU,
    )
    one = replicating({"region": EU}, keep_latest=3)
    assert plan_copies([inventory(*sources), target], one, NOW) == []


def test_a_retired_copy_is_not_made_again_unless_its_source_is_wanted_again() -> None:
    old, new1, new2 = image(days_old=300), image(days_old=10), image(days_old=20)
    # The janitor retired the copy of `old`: `old` is no longer among the wanted sources.
    old = started(old, 1)
    gone = retired(replica(old))
    copies = [replica(new1), replica(new2)]
    target = inventory(*copies, region=EU, ledger=ledger_of(gone, *copies))
    assert plan_replication([inventory(old, new1, new2), target], EU_ONLY, NOW) == ([], [])
    # Both newer sources are deregistered: `old` is wanted again, and its old token must not be reused.
    copies_planned, problems = plan_replication(
        [inventory(old), inventory(region=EU, ledger=ledger_of(gone))], EU_ONLY, NOW
    )
    assert pairs(copies_planned) == [(old.image_id, EU, 2)] and problems == []


# Sources in both regions, each copied to eu-west-1 (its own builds encrypted in place there).
BOTH_REGIONS = policy(
    {"replicate": [{"region": EU, "kms_key_id": KEY_EU}], "latest": {"tag": "Latest"}}, regions=[US, EU]
)


def test_a_copy_its_target_group_would_not_keep_is_not_made() -> None:
    s1, s2 = image(days_old=10), image(days_old=40)
    e1, e2 = image(days_old=5, region=EU), image(days_old=35, region=EU)
    copies, problems = plan_replication([inventory(s1, s2), inventory(e1, e2, region=EU)], BOTH_REGIONS, NOW)
    # eu-west-1 keeps its 2 newest: e1 (encrypted in place) and the copy of s1; a copy of s2 (or of e2)
    # would rank third there, although s2 is among the 2 newest of us-east-1.
    assert pairs(copies) == [(e1.image_id, EU, 1), (s1.image_id, EU, 1)] and problems == []
    # Made and available, each copy is among the 2 newest of its group there: none is a candidate.
    made = [replica(e1, encrypted=True), replica(s1)]
    after = inventory(e1, e2, *made, region=EU)
    decisions = {d.image_id: d for d in plan([after], BOTH_REGIONS, NOW).decisions}
    for copy in made:
        assert decisions[copy.image_id].action == "keep"
        assert decisions[copy.image_id].reasons[0].startswith("among the 2 newest of its group")
    assert plan_replication([inventory(s1, s2), after], BOTH_REGIONS, NOW) == ([], [])


def test_a_copy_the_janitor_retired_is_made_again_only_once_its_target_group_would_keep_it() -> None:
    s1, s2 = started(image(days_old=10), 1), started(image(days_old=40), 1)
    e1 = image(days_old=5, region=EU)
    copy1, gone = replica(s1), retired(replica(s2))
    # eu-west-1 keeps e1 and the copy of s1: the copy of s2 was a candidate there, and the janitor
    # retired it. s2 is still among the 2 newest of us-east-1: it is not copied again, and its retired
    # copy is no failure.
    eu = inventory(e1, copy1, region=EU, ledger=ledger_of(copy1, gone))
    assert plan_replication([inventory(s1, s2), eu], EU_ONLY, NOW) == ([], [])
    # e1 is deregistered by hand: the copy of s2 would be among the 2 newest there once more.
    eu = inventory(copy1, region=EU, ledger=ledger_of(copy1, gone))
    copies, problems = plan_replication([inventory(s1, s2), eu], EU_ONLY, NOW)
    assert pairs(copies) == [(s2.image_id, EU, 2)] and problems == []


def test_a_retired_copy_counts_no_failure_toward_the_bound() -> None:
    source = started(image(days_old=10), 1, 2, 3)
    # Retired three times (its source dropped out of the wanted and came back each time).
    gone = [retired(replica(source, generation=g)) for g in (1, 2, 3)]
    eu = inventory(region=EU, ledger=ledger_of(*gone))
    copies, problems = plan_replication([inventory(source), eu], EU_ONLY, NOW)
    assert pairs(copies) == [(source.image_id, EU, 4)] and problems == []
    # The worker takes the generation the janitor planned.
    assert rebuild_copy(copies[0], source, EU_ONLY) == copies[0]
    # Two failed and one retired: a third generation may still fail.
    failed = [replica(source, state="failed", generation=g) for g in (1, 2)]
    eu = inventory(*failed, region=EU, ledger=ledger_of(*failed, gone[2]))
    assert pairs(plan_copies([inventory(source), eu], EU_ONLY, NOW)) == [(source.image_id, EU, 4)]
    # Three failed: given up and reported, the retired one aside.
    source = started(source, 1, 2, 3, 4)
    failed.append(replica(source, state="failed", generation=4))
    eu = inventory(*failed, region=EU, ledger=ledger_of(*failed, gone[2]))
    copies, problems = plan_replication([inventory(source), eu], EU_ONLY, NOW)
    assert copies == [] and len(problems) == 1 and "3 generations failed" in problems[0]


def test_a_made_copy_whose_item_expired_takes_the_next_generation_unless_ec2_still_lists_it() -> None:
    # The janitor retired the copy of generation 1, and retention_days later its item expired: the
    # target's ledger no longer names it. The source's record has the copy's id (it was made), so the
    # next copy takes a new generation: EC2 would answer the old token with the deregistered copy.
    source = image(days_old=10)
    made = (copy_record(source, EU, 1, image_id="ami-0aaaaaaaaaaaaaaa1"),)
    source_made = source.model_copy(update={"ledger": LedgerItem(image_id=source.image_id, copies=made)})
    expired = inventory(region=EU, ledger=ledger_of())
    copies, problems = plan_replication([inventory(source_made), expired], EU_ONLY, NOW)
    assert pairs(copies) == [(source.image_id, EU, 2)] and problems == []
    assert rebuild_copy(copies[0], source_made, EU_ONLY) == copies[0]
    # Without the id the generation was started and never made (CopyImage unanswered): its own token.
    assert pairs(plan_copies([inventory(started(source, 1)), expired], EU_ONLY, NOW)) == [
        (source.image_id, EU, 1)
    ]
    # Made, and EC2 still lists it, but its item is gone (the table restored or made again): its own
    # token too, which EC2 answers with that copy (its item is written again), never a second copy.
    alive = replica(source).model_copy(update={"image_id": "ami-0aaaaaaaaaaaaaaa1", "ledger": None})
    lost = inventory(alive, region=EU, ledger=ledger_of())
    assert pairs(plan_copies([inventory(source_made), lost], EU_ONLY, NOW)) == [(source.image_id, EU, 1)]


def test_a_copy_in_flight_counts_as_the_available_copy_it_becomes() -> None:
    s1, s2 = image(days_old=10), image(days_old=20)
    native = image(days_old=15, region=EU)
    # Once the copy of s1 is available, eu-west-1 keeps it and its own build: a copy of s2 would be third.
    in_flight = replica(s1, state="pending")
    assert plan_copies([inventory(s1, s2), inventory(native, in_flight, region=EU)], EU_ONLY, NOW) == []


def test_a_failed_copy_is_started_again_with_the_next_generation_up_to_the_bound() -> None:
    source = started(image(days_old=10), 1)
    first = replica(source, state="failed", generation=1)
    copies, problems = plan_replication([inventory(source), inventory(first, region=EU)], EU_ONLY, NOW)
    assert pairs(copies) == [(source.image_id, EU, 2)] and problems == []
    # The source's record is ahead of the copies: generation 2 was recorded, its replica never was (the
    # run stopped between the two writes). It is started again with its own token, never skipped.
    ahead = started(source, 1, 2)
    copies = plan_copies([inventory(ahead), inventory(first, region=EU)], EU_ONLY, NOW)
    assert pairs(copies) == [(source.image_id, EU, 2)]
    second = replica(source, state="failed", generation=2)
    last = replica(source, state="failed", generation=MAX_COPY_GENERATIONS)
    failed = inventory(first, second, last, region=EU)
    copies, problems = plan_replication([inventory(source), failed], EU_ONLY, NOW)
    assert copies == []
    assert len(problems) == 1
    assert source.image_id in problems[0] and EU in problems[0] and "3 generations failed" in problems[0]
    assert copy_problems([inventory(source), failed], EU_ONLY, NOW) == problems


def test_a_copy_the_ledger_does_not_record_is_no_copy_of_the_source() -> None:
    source = image(days_old=10)
    # EC2 says it was copied from the source, the ledger says nothing (made by hand, or its record is
    # lost): an original of its region, and the source still gets the janitor's own copy.
    by_hand = image(days_old=1, region=EU, copied_from=source.image_id, copied_from_region=US)
    assert not by_hand.is_replica and by_hand.order_time == by_hand.created
    assert pairs(plan_copies([inventory(source), inventory(by_hand, region=EU)], EU_ONLY, NOW)) == [
        (source.image_id, EU, 1)
    ]
    # A ledger record naming another source than EC2 does is no replica either.
    other = replica(image(days_old=20), state="available")
    forged = other.model_copy(update={"copied_from": source.image_id})
    assert not forged.is_replica


def test_a_same_region_target_encrypts_unencrypted_sources_in_place_only() -> None:
    plain, encrypted = image(days_old=10), image(days_old=20, encrypted=True)
    both = replicating({"region": US, "kms_key_id": KEY_US}, {"region": EU})
    copies = plan_copies([inventory(plain, encrypted), inventory(region=EU)], both, NOW)
    assert [(c.source_image_id, c.region, c.kms_key_id) for c in copies] == [
        (plain.image_id, EU, None),
        (plain.image_id, US, KEY_US),
        (encrypted.image_id, EU, None),
    ]
    # Once the encrypted copy exists it is a replica, never a source of its own.
    in_place = replica(plain, region=US, encrypted=True)
    copies = plan_copies([inventory(plain, encrypted, in_place), inventory(region=EU)], both, NOW)
    assert pairs(copies) == [(plain.image_id, EU, 1), (encrypted.image_id, EU, 1)]


def test_a_same_region_target_without_a_key_is_a_policy_problem() -> None:
    source = image(days_old=10)
    keyless = replicating({"region": US}, {"region": EU})
    copies, problems = plan_replication([inventory(source), inventory(region=EU)], keyless, NOW)
    assert pairs(copies) == [(source.image_id, EU, 1)]
    assert problems == [
        "family app: replicate target us-east-1 is the source region and has no kms_key_id "
        "(a same-region copy only encrypts in place): ignored"
    ]


def made_with(copy: Image, key: str | None) -> Image:
    """The copy as its ledger item records it made by the family with `key` (None: before keys were recorded)."""
    assert copy.ledger is not None and copy.ledger.replica is not None
    record = copy.ledger.replica.model_copy(update={"family": "app", "kms_key_id": key, "kms_key_arn": key})
    return copy.model_copy(update={"ledger": copy.ledger.model_copy(update={"replica": record})})


def test_copies_made_with_a_key_the_target_no_longer_names_stand_and_the_plan_says_so() -> None:
    new_key = "arn:aws:kms:eu-west-1:111122223333:key/new"
    sources = [image(days_old=d) for d in (10, 20, 30)]
    old = [made_with(replica(s), KEY_EU) for s in sources[1:]]
    pending = made_with(replica(sources[0], state="pending"), KEY_EU)
    unknown = made_with(replica(image(days_old=40)), None)  # before keys were recorded: not judged
    target = inventory(*old, pending, unknown, region=EU)._replace(ledger=ledger_of(*old, pending, unknown))
    rekeyed = replicating({"region": EU, "kms_key_id": new_key})

    copies, problems = plan_replication([inventory(*sources), target], rekeyed, NOW)

    assert copies == []  # each source has a usable copy there: none is made again with the new key
    ids = ", ".join(sorted(c.image_id for c in [*old, pending]))
    assert problems == [
        f"family app: 3 copies of sources in {US} to {EU} were made with {KEY_EU} and the target names "
        f"{new_key} now ({ids}): they stand for their sources there and retire by that region's rules; "
        "only a source without a usable copy there is copied with the target's key"
    ]
    unkeyed = replicating({"region": EU})
    assert plan_replication([inventory(*sources), target], unkeyed, NOW)[1][0].startswith(
        f"family app: 3 copies of sources in {US} to {EU} were made with {KEY_EU} and the target names no key now"
    )
    # The key the target names: nothing to say.
    assert plan_replication([inventory(*sources), target], EU_ONLY, NOW) == ([], [])


def test_no_copy_to_a_target_whose_inventory_failed_or_is_missing() -> None:
    source = image(days_old=10)
    two = replicating({"region": EU}, {"region": WEST})
    broken = RegionInventory(region=EU, error="ec2:DescribeImages: Throttling: slow down")
    copies = plan_copies([inventory(source), broken], two, NOW)
    assert copies == []  # us-west-2 was not loaded at all
    copies = plan_copies([inventory(source), broken, inventory(region=WEST)], two, NOW)
    assert pairs(copies) == [(source.image_id, WEST, 1)]


def test_no_copy_from_a_source_region_whose_inventory_failed() -> None:
    broken = RegionInventory(region=US, error="autoscaling: AccessDenied")
    assert plan_copies([broken, inventory(region=EU)], EU_ONLY, NOW) == []


def test_sources_are_read_only_in_the_policy_regions_and_replicas_are_never_sources() -> None:
    source = image(days_old=10)
    eu_native = image(days_old=5, region=EU)  # built in a target region: not replicated from there
    foreign = replica(image(days_old=3, region=WEST), region=US)  # the janitor's copy from elsewhere
    copies = plan_copies([inventory(source, foreign), inventory(eu_native, region=EU)], EU_ONLY, NOW)
    assert pairs(copies) == [(source.image_id, EU, 1)]


def test_order_is_source_region_family_architecture_newest_first_target() -> None:
    both = replicating({"region": WEST}, {"region": EU})
    x86 = [image(days_old=d) for d in (20, 10)]
    arm = [image(days_old=d, arch="arm64") for d in (15, 5)]
    copies = plan_copies([inventory(*x86, *arm), inventory(region=EU), inventory(region=WEST)], both, NOW)
    assert pairs(copies) == [
        (arm[1].image_id, EU, 1),
        (arm[1].image_id, WEST, 1),
        (arm[0].image_id, EU, 1),
        (arm[0].image_id, WEST, 1),
        (x86[1].image_id, EU, 1),
        (x86[1].image_id, WEST, 1),
        (x86[0].image_id, EU, 1),
        (x86[0].image_id, WEST, 1),
    ]


def test_families_without_targets_and_instance_store_sources_are_not_copied() -> None:
    plain = policy(regions=[US])
    assert plan_copies([inventory(image(days_old=1)), inventory(region=EU)], plain, NOW) == []
    legacy = image(days_old=1, root_device_type="instance-store", snapshots=())
    copies, problems = plan_replication([inventory(legacy), inventory(region=EU)], EU_ONLY, NOW)
    assert copies == [] and problems == [
        f"{legacy.image_id} (us-east-1) is instance-store backed: not replicated"
    ]


# ---- copy_request -------------------------------------------------------------------------------


def tagged_source(**fields: Any) -> Image:
    tags = {
        "Project": "App",
        "Team": "ml",
        "Latest": "true",
        "ami-janitor:keep": "",
        CANDIDATE_TAG: "2026-11-01T00:00:00Z",
        COPY_GENERATION_TAG_PREFIX + EU: "1",
        "aws:cloudformation:stack-name": "x",
    }
    return image(days_old=10, name="app-20261115", image_id="ami-0123456789abcdef0", tags=tags, **fields)


def copy_of(source: Image, region: str = EU, key: str | None = KEY_EU, generation: int = 1) -> Copy:
    return Copy(
        family="app",
        source_image_id=source.image_id,
        source_region=source.region,
        region=region,
        kms_key_id=key,
        generation=generation,
    )


def test_copy_request_is_exact() -> None:
    source = tagged_source()
    request = copy_request(copy_of(source), source, EU_ONLY)
    tags = [
        {"Key": "Project", "Value": "App"},
        {"Key": "Team", "Value": "ml"},
        {"Key": SOURCE_IMAGE_TAG, "Value": "ami-0123456789abcdef0"},
        {"Key": SOURCE_REGION_TAG, "Value": US},
        {"Key": SOURCE_CREATED_TAG, "Value": iso(source.created)},
        {"Key": COPY_GENERATION_TAG_PREFIX + EU, "Value": "1"},
    ]
    assert request == {
        "SourceRegion": US,
        "SourceImageId": "ami-0123456789abcdef0",
        "Name": "app-20261115",
        "Description": "[Copied ami-0123456789abcdef0 from us-east-1] app-20261115",
        "ClientToken": client_token(copy_of(source)),
        "CopyImageTags": False,
        "TagSpecifications": [
            {"ResourceType": "image", "Tags": tags},
            {"ResourceType": "snapshot", "Tags": tags},
        ],
        "Encrypted": True,
        "KmsKeyId": KEY_EU,
    }


def test_copy_request_without_a_key_keeps_the_source_encryption() -> None:
    source = tagged_source()
    request = copy_request(copy_of(source, key=None), source, replicating({"region": EU}))
    assert "Encrypted" not in request and "KmsKeyId" not in request


def test_a_same_region_copy_is_encrypted_under_another_name_and_needs_a_key() -> None:
    source = tagged_source()
    in_place = replicating({"region": US, "kms_key_id": KEY_US})
    request = copy_request(copy_of(source, US, KEY_US), source, in_place)
    assert request["Name"] == "app-20261115-encrypted"
    assert (request["Encrypted"], request["KmsKeyId"], request["SourceRegion"]) == (True, KEY_US, US)
    with pytest.raises(ValueError, match="needs a kms_key_id"):
        copy_request(copy_of(source, US, None), source, in_place)


def test_the_client_token_is_stable_and_changes_with_the_generation() -> None:
    source = tagged_source()
    first, again, second = copy_of(source), copy_of(source), copy_of(source, generation=2)
    assert client_token(first) == client_token(again)
    assert client_token(first) != client_token(second)
    assert client_token(first) != client_token(copy_of(source, region=WEST))
    assert len(client_token(first)) <= 64 and client_token(first).isascii()
    request = copy_request(second, source, EU_ONLY)
    assert request["Name"] == "app-20261115-copy2"
    generation = {t["Key"]: t["Value"] for t in request["TagSpecifications"][0]["Tags"]}
    assert generation[COPY_GENERATION_TAG_PREFIX + EU] == "2"


def test_a_suffix_goes_where_the_family_name_glob_still_matches() -> None:
    anchored = policy(
        {"match": {"name": "*-x86_64"}, "replicate": [{"region": US, "kms_key_id": KEY_US}]}, regions=[US]
    )
    source = image(days_old=1, name="app-1-x86_64")
    request = copy_request(copy_of(source, US, KEY_US), source, anchored)
    assert request["Name"] == "encrypted-app-1-x86_64"
    long_name = image(days_old=1, name="a" * 128)
    name = copy_request(
        copy_of(long_name, US, KEY_US, 2), long_name, replicating({"region": US, "kms_key_id": KEY_US})
    )["Name"]
    assert len(name) == 128 and name.endswith("-encrypted-copy2")


def test_a_copy_is_named_after_its_source_region_where_the_family_has_sources_in_several() -> None:
    """The same night's bakes share a name in every region: a copy of us-east-1's into eu-west-1 (which
    bakes too), or of both regions' into a third, takes its source region as a suffix (CopyImage would
    refuse the taken name every time). With one source region, a copy keeps its source's name."""
    several = policy(
        {"replicate": [{"region": EU}, {"region": WEST}], "bake": {"instance_tag": {"Role": "app"}}},
        regions=[US, EU],
    )
    source = image(days_old=1, name="app-20261125T020000Z")
    assert (
        copy_request(copy_of(source, key=None), source, several)["Name"] == "app-20261125T020000Z-us-east-1"
    )
    to_west = copy_of(source, region=WEST, key=None)
    assert copy_request(to_west, source, several)["Name"] == "app-20261125T020000Z-us-east-1"
    second = copy_of(source, key=None, generation=2)
    assert copy_request(second, source, several)["Name"] == "app-20261125T020000Z-us-east-1-copy2"
    one = policy({"replicate": [{"region": EU}], "bake": {"instance_tag": {"Role": "app"}}}, regions=[US])
    assert copy_request(copy_of(source, key=None), source, one)["Name"] == "app-20261125T020000Z"


def test_the_opt_out_tag_of_the_family_is_not_copied_even_when_it_is_not_janitor_owned() -> None:
    custom = replicating({"region": EU}, opt_out_tag="DoNotDelete")
    source = image(days_old=1, tags={"DoNotDelete": "yes", "Owner": "ml"})
    tags = {
        t["Key"]
        for t in copy_request(copy_of(source, key=None), source, custom)["TagSpecifications"][0]["Tags"]
    }
    assert "DoNotDelete" not in tags and "Owner" in tags


def test_at_most_50_tags_and_the_match_tags_are_kept_first() -> None:
    many = {f"k{n:02d}": "v" for n in range(60)}
    source = image(days_old=1, tags=many)  # plus Project=App, the family's match tag
    tags = copy_request(copy_of(source), source, EU_ONLY)["TagSpecifications"][0]["Tags"]
    keys = [t["Key"] for t in tags]
    assert len(keys) == 50 and "Project" in keys and SOURCE_IMAGE_TAG in keys


def test_instance_store_sources_get_no_snapshot_tags() -> None:
    source = image(days_old=1, root_device_type="instance-store", snapshots=())
    request = copy_request(copy_of(source), source, EU_ONLY)
    assert [s["ResourceType"] for s in request["TagSpecifications"]] == ["image"]


def test_a_request_for_another_source_is_refused() -> None:
    source, other = image(days_old=1), image(days_old=2)
    with pytest.raises(ValueError, match="is not the copy's source"):
        copy_request(copy_of(other), source, EU_ONLY)


# ---- the failed-replica path --------------------------------------------------------------------


def test_a_failed_replica_plans_its_next_generation() -> None:
    source = image(days_old=10)
    retry = handle_failed_replica(replica(source, state="failed", generation=1), EU_ONLY)
    assert retry.copy == copy_of(source, generation=2)
    # A forged generation tag changes nothing: the ledger's record is the copy's generation.
    forged = replica(source, state="failed", generation=2)
    forged = forged.model_copy(update={"tags": {**forged.tags, COPY_GENERATION_TAG_PREFIX + EU: "1"}})
    assert handle_failed_replica(forged, EU_ONLY).copy == copy_of(source, generation=3)


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (
            lambda s: replica(s, state="failed", generation=MAX_COPY_GENERATIONS),
            f"starts it again only if fewer than {MAX_COPY_GENERATIONS} of its generations failed",
        ),
        (lambda s: replica(s, state="available", generation=1), "nothing to retry"),
        (lambda s: s.model_copy(update={"state": "failed"}), "not a copy made by the janitor"),
        (lambda s: replica(s, region=WEST, state="failed"), "no longer a replicate target"),
    ],
)
def test_a_failed_replica_is_not_retried(make: Any, why: str) -> None:
    retry = handle_failed_replica(make(image(days_old=10)), EU_ONLY)
    assert retry.copy is None and why in retry.reason


# ---- the queue message --------------------------------------------------------------------------


def test_a_copy_message_round_trips_and_a_bad_one_names_the_field() -> None:
    copy = copy_of(image(days_old=1, image_id="ami-0abc12345678def90"), generation=2)
    assert copy_from_message(copy.model_dump_json()) == copy
    body = json.loads(copy.model_dump_json())
    del body["region"]
    with pytest.raises(BadCopyMessage, match="region: Field required"):
        copy_from_message(json.dumps(body))
    with pytest.raises(BadCopyMessage, match="bad copy request"):
        copy_from_message("not json")
    with pytest.raises(BadCopyMessage, match="generation: must be >= 1"):
        copy_from_message(copy.model_copy(update={"generation": 0}).model_dump_json())
    with pytest.raises(BadCopyMessage, match="source_image_id"):
        copy_from_message(copy.model_copy(update={"source_image_id": "snap-1"}).model_dump_json())


# ---- what the worker accepts: a request rebuilt from the policy -------------------------------------

OTHER_KEY = "arn:aws:kms:eu-west-1:999999999999:key/other"
# Two families: `app` (EU with a key, WEST without, US without: ignored) and `db`; sources in us-east-1.
TWO_FAMILIES = policy(
    regions=[US],
    families=[
        {
            "name": "app",
            "match": {"tags": {"Project": "App"}},
            "replicate": [{"region": EU, "kms_key_id": KEY_EU}, {"region": WEST}, {"region": US}],
        },
        {"name": "db", "match": {"tags": {"Project": "Db"}}, "replicate": [{"region": EU}]},
    ],
)


def test_a_request_the_planner_makes_is_rebuilt_as_it_is_with_the_policy_key() -> None:
    source = image(days_old=1)
    for request in (copy_of(source), copy_of(source, region=WEST, key=None)):
        assert rebuild_copy(request, source, TWO_FAMILIES) == request
    planned = plan_copies(
        [inventory(source), inventory(region=EU), inventory(region=WEST)], TWO_FAMILIES, NOW
    )
    assert [rebuild_copy(c, source, TWO_FAMILIES) for c in planned] == planned
    assert {c.kms_key_id for c in planned if c.region == EU} == {KEY_EU}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"source_region": WEST}, "source region us-west-2 is not one of the policy's regions (us-east-1)"),
        ({"family": "gone"}, "family gone is not in the policy"),
        ({"region": "ap-south-1"}, "target region ap-south-1 is not a replicate target of family app"),
        # A same-region target without a key is no target (it could only encrypt in place).
        ({"region": US, "kms_key_id": None}, "target region us-east-1 is not a replicate target"),
        ({"kms_key_id": None}, f"kms_key_id missing: target eu-west-1 encrypts copies with {KEY_EU}"),
        ({"kms_key_id": OTHER_KEY}, f"kms_key_id {OTHER_KEY} is not the key target eu-west-1 configures"),
        ({"region": WEST, "kms_key_id": KEY_EU}, "target us-west-2 configures no key"),
        ({"generation": 99}, "generation 99 is above 1, the highest the janitor could plan"),
        ({"generation": 0}, "generation 0 is below 1"),
    ],
)
def test_a_request_the_policy_does_not_make_is_refused_with_the_reason(
    change: dict[str, Any], reason: str
) -> None:
    source = image(days_old=1)
    request = copy_of(source).model_copy(update=change)
    with pytest.raises(RefusedCopy, match="copy request refused: ") as refused:
        rebuild_copy(request, source, TWO_FAMILIES)
    assert reason in refused.value.reason
    assert refused.value.request == request
    assert isinstance(refused.value, BadCopyMessage)  # the worker handles both alike


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: image(days_old=1, tags={"Project": "Other"}), "is in no family of the policy"),
        (lambda: image(days_old=1, tags={"Project": "Db"}), "is a member of family db, not app"),
        (lambda: replica(image(days_old=1), region=US), "is itself a copy"),
        (lambda: image(days_old=1, root_device_type="instance-store"), "instance-store backed"),
    ],
)
def test_a_source_that_is_no_member_of_the_family_is_refused(make: Any, reason: str) -> None:
    source = make()
    with pytest.raises(RefusedCopy, match=reason):
        rebuild_copy(copy_of(source), source, TWO_FAMILIES)


def test_a_copy_of_an_own_ami_is_never_copied_onward_one_copied_in_is_a_source() -> None:
    """A hand-made copy (or one a stopped run never recorded) in eu-west-1 of a us-east-1 AMI is never
    copied again (a copy of a copy, a second copy in a third region); an AMI copied in from another
    account (a golden image shared with it: its source is none of this account's) is a source."""
    pol = policy({"replicate": [{"region": EU}, {"region": WEST}]}, regions=[US, EU])
    source = image(region=US, days_old=3)
    by_hand = image(region=EU, days_old=2, copied_from=source.image_id, copied_from_region=US)
    golden = image(region=EU, days_old=1, copied_from="ami-0aaaaaaaaaaaaaaa9", copied_from_region=US)
    copies = plan_copies(
        [inventory(source), inventory(by_hand, golden, region=EU), inventory(region=WEST)], pol, NOW
    )
    assert {c.source_image_id for c in copies} == {source.image_id, golden.image_id}


def test_a_source_of_two_families_is_refused() -> None:
    both = policy(
        regions=[US],
        families=[
            {"name": "app", "match": {"tags": {"Project": "App"}}, "replicate": [{"region": EU}]},
            {"name": "apps", "match": {"name": "app-*"}, "replicate": [{"region": EU}]},
        ],
    )
    source = image(days_old=1)
    with pytest.raises(RefusedCopy, match=r"matches several families \(app, apps\)"):
        rebuild_copy(copy_of(source, key=None), source, both)


def test_a_request_for_another_source_than_the_one_described_is_refused() -> None:
    source, other = image(days_old=1), image(days_old=2)
    with pytest.raises(RefusedCopy, match="is not the request's source"):
        rebuild_copy(copy_of(other), source, TWO_FAMILIES)


def test_the_generation_is_at_most_one_above_the_highest_started() -> None:
    fresh = image(days_old=1)
    with pytest.raises(RefusedCopy, match="generation 2 is above 1, the highest the janitor could plan"):
        rebuild_copy(copy_of(fresh, generation=2), fresh, TWO_FAMILIES)
    recorded = started(image(days_old=1), 1)
    assert rebuild_copy(copy_of(recorded, generation=2), recorded, TWO_FAMILIES).generation == 2
    with pytest.raises(RefusedCopy, match="generation 3 is above 2"):
        rebuild_copy(copy_of(recorded, generation=3), recorded, TWO_FAMILIES)
    # The source's record may be lost; the failed copy carries its own generation, as the planner reads it.
    failed = replica(fresh, state="failed", generation=2)
    assert rebuild_copy(copy_of(fresh, generation=3), fresh, TWO_FAMILIES, [failed]).generation == 3
    # An older generation passes (start_copy then says it is superseded).
    assert rebuild_copy(copy_of(recorded), recorded, TWO_FAMILIES).generation == 1


def test_no_new_generation_once_the_bound_of_failed_copies_is_reached() -> None:
    fresh = image(days_old=1)
    failed = [replica(fresh, state="failed", generation=g) for g in range(1, MAX_COPY_GENERATIONS + 1)]
    with pytest.raises(RefusedCopy, match=f"{MAX_COPY_GENERATIONS} generations of its copy to {EU} failed"):
        rebuild_copy(copy_of(fresh, generation=MAX_COPY_GENERATIONS + 1), fresh, TWO_FAMILIES, failed)
    # A generation already started is no new one: start_copy finds it failed and copies nothing.
    assert rebuild_copy(copy_of(fresh, generation=3), fresh, TWO_FAMILIES, failed).generation == 3
    # A copy the janitor retired is no failure.
    one_retired = [*failed[:-1], retired(failed[-1])]
    assert rebuild_copy(copy_of(fresh, generation=4), fresh, TWO_FAMILIES, one_retired).generation == 4


class FlakySqs:
    """send_message_batch that refuses some entries once (not the sender's fault), or fails outright."""

    def __init__(self, refuse_once: set[str] | None = None, broken: bool = False) -> None:
        self.refuse = set(refuse_once or ())
        self.broken = broken
        self.calls: list[list[str]] = []
        self.bodies: list[str] = []

    def send_message_batch(self, QueueUrl: str, Entries: list[dict[str, str]]) -> dict[str, Any]:
        from botocore.exceptions import ClientError

        self.calls.append([e["Id"] for e in Entries])
        if self.broken:
            raise ClientError(
                {"Error": {"Code": "AWS.SimpleQueueService.NonExistentQueue"}}, "SendMessageBatch"
            )
        ok, failed = [], []
        for entry in Entries:
            body = json.loads(entry["MessageBody"])
            if body["source_image_id"] in self.refuse:
                self.refuse.discard(body["source_image_id"])
                failed.append({"Id": entry["Id"], "SenderFault": False, "Code": "InternalError"})
            else:
                ok.append({"Id": entry["Id"]})
                self.bodies.append(entry["MessageBody"])
        return {"Successful": ok, "Failed": failed}


def test_enqueue_sends_ten_per_call_and_retries_refused_entries_once() -> None:
    copies = [copy_of(image(days_old=1, image_id=f"ami-{n:017x}")) for n in range(1, 24)]
    sqs = FlakySqs(refuse_once={copies[3].source_image_id})
    assert enqueue_copies(sqs, "https://queue", copies) == 23  # type: ignore[arg-type]
    assert [len(c) for c in sqs.calls] == [10, 1, 10, 3]
    assert sorted(copy_from_message(b).source_image_id for b in sqs.bodies) == sorted(
        c.source_image_id for c in copies
    )
    assert enqueue_copies(FlakySqs(broken=True), "https://queue", copies) == 0  # type: ignore[arg-type]


def test_a_family_without_latest_copies_only_what_its_target_keeps_by_rank() -> None:
    """No Latest keeps a copy where the family has none: with keep_latest 1 and the target's newest copy
    disabled by its owner, the next source is not copied (its copy would be retired there at once)."""
    no_latest = policy({"replicate": [{"region": EU}], "keep_latest": 1}, regions=[US])
    s1, s2 = image(days_old=40), image(days_old=50)
    s2 = s2.model_copy(update={"tags": {**s2.tags, "ami-janitor:keep": "1"}})  # kept in us-east-1
    d1 = replica(s1, state="disabled")
    copies, _ = plan_replication(
        [inventory(s1, s2), inventory(d1, region=EU, ledger=ledger_of(d1))], no_latest, NOW
    )
    assert pairs(copies) == []


def test_a_suffix_goes_inside_the_name_where_the_glob_ends_with_fixed_text() -> None:
    """A glob with the build stamp in the middle and fixed text at the end (`app-*-amd64`) names neither
    `...-amd64-encrypted` nor `encrypted-app-...`: the suffix goes before the fixed end, so the copy is
    still a member of its family (an encrypt-in-place copy stands in for its original; a replica counts
    toward its region's keep-N and Latest, and retires there)."""
    family = {"match": {"tags": {"Project": "App"}, "name": "app-*-amd64"}, "latest": {"tag": "Latest"}}
    in_place = policy({**family, "replicate": [{"region": US, "kms_key_id": KEY_US}]}, regions=[US])
    source = image(name="app-20261124-amd64", days_old=1)
    name = copy_request(copy_of(source, US, KEY_US), source, in_place)["Name"]
    assert name == "app-20261124-encrypted-amd64"
    encrypted = copied(source.image_id, US, source.created, name=name, days_old=0, tags={"Project": "App"})
    [group], _ = build_groups(inventory(source, encrypted), in_place)
    assert encrypted.image_id in [m.image_id for m in group.members]
    assert group.superseded == {source.image_id}

    several = policy({**family, "replicate": [{"region": EU}]}, regions=[US, WEST])
    second = copy_of(source, key=None, generation=2)
    assert copy_request(second, source, several)["Name"] == "app-20261124-us-east-1-copy2-amd64"
    # No separator before the fixed end: inside the name all the same.
    stamped = policy({"match": {"name": "app-2026*amd64"}, "replicate": [{"region": EU}]}, regions=[US, WEST])
    joined = image(name="app-20261124amd64", days_old=1)
    assert copy_request(copy_of(joined, key=None), joined, stamped)["Name"] == "app-20261124-us-east-1amd64"
    # Long names keep their fixed end and stay within 128 characters.
    long_name = image(name="app-" + "1" * 118 + "-amd64", days_old=1)
    name = copy_request(copy_of(long_name, US, KEY_US), long_name, in_place)["Name"]
    assert len(name) == 128 and name.endswith("-encrypted-amd64") and in_place.families[0].match.names(name)


def test_copies_planned_to_a_region_stay_within_its_copies_in_flight() -> None:
    """EC2 takes 300 copies in flight per destination: 280 are pending in eu-west-1, so 20 of the 320
    copies wanted there are planned and the rest are left, with a note, for a later run."""
    from ami_janitor.core.replication import MAX_CONCURRENT_COPIES
    from ami_janitor.core.run_plan import plan_run

    key = "arn:aws:kms:eu-west-1:111122223333:key/eu"
    many = policy({"replicate": [{"region": "eu-west-1", "kms_key_id": key}]}, defaults={"keep_latest": 400})
    sources = [image(days_old=40 + n) for n in range(320)]
    in_flight = [
        image(
            days_old=0,
            region="eu-west-1",
            state="pending",
            name=f"other-{n}",
            copied_from=f"ami-{n:017x}f",
            copied_from_region="us-east-1",
        )
        for n in range(280)
    ]
    planned = plan_run([inventory(*sources)], many, NOW, targets=[inventory(*in_flight, region="eu-west-1")])
    assert MAX_CONCURRENT_COPIES == 300
    assert len(planned.copies) == 20
    # The newest sources first: the later run copies the older ones.
    newest = sorted(sources, key=lambda i: i.created, reverse=True)[:20]
    assert {c.source_image_id for c in planned.copies} == {i.image_id for i in newest}
    assert (
        "300 copies to eu-west-1 left for a later run: EC2 takes 300 copies in flight per region (280 in "
        "flight there, 20 planned now)"
    ) in planned.notes


def test_a_first_run_over_many_families_plans_no_more_copies_to_a_region_than_it_takes() -> None:
    from ami_janitor.core.policy import parse_policy
    from ami_janitor.core.run_plan import plan_run

    families = [
        {
            "name": f"svc{n}",
            "match": {"tags": {"Project": f"Svc{n}"}, "name": f"svc{n}-*"},
            "replicate": [{"region": "eu-west-1"}, {"region": "us-west-2"}],
        }
        for n in range(110)
    ]
    org = parse_policy({"regions": ["us-east-1"], "defaults": {"keep_latest": 3}, "families": families})
    sources = [
        image(days_old=40 + k, name=f"svc{n}-{k}", tags={"Project": f"Svc{n}"})
        for n in range(110)
        for k in range(3)
    ]
    # us-west-2 has copies of another account's AMIs in flight; a copy there that is available does not count.
    other = [
        image(days_old=0, region="us-west-2", state=state, name=f"x-{n}", copied_from=f"ami-{n:017x}e")
        for n, state in enumerate(["pending"] * 100 + ["available"] * 50)
    ]
    targets = [inventory(region="eu-west-1"), inventory(*other, region="us-west-2")]
    planned = plan_run([inventory(*sources)], org, NOW, targets=targets)
    by_region = {r: [c for c in planned.copies if c.region == r] for r in ("eu-west-1", "us-west-2")}
    assert (len(by_region["eu-west-1"]), len(by_region["us-west-2"])) == (300, 200)
    held = [n for n in planned.notes if "left for a later run" in n]
    assert held == [
        "30 copies to eu-west-1 left for a later run: EC2 takes 300 copies in flight per region (0 in flight "
        "there, 300 planned now)",
        "130 copies to us-west-2 left for a later run: EC2 takes 300 copies in flight per region (100 in "
        "flight there, 200 planned now)",
    ]
