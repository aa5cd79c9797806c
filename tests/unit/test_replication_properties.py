"""Replication and sharing converge (hypothesis), against an in-memory account.

The account answers the calls replication and sharing make (DescribeImages by provenance tag,
CreateTags, DeleteTags, CopyImage with EC2's ClientToken memory, unique names and SourceImageId,
ModifyImageAttribute), keeps a ledger per region (the writes the copier and sharer make, with their
conditions) and can freeze what DescribeImages and the ledger show, to replay two workers racing on
stale reads. The API shapes are checked on moto and with the Stubber in tests/integration.
"""

from __future__ import annotations

import copy as copying
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, cast

from botocore.exceptions import ClientError
from hypothesis import event, given
from hypothesis import strategies as st

from ami_janitor.aws.clients import RegionClients
from ami_janitor.aws.copier import find_copies, start_copy
from ami_janitor.aws.ledger import Ledger
from ami_janitor.aws.sharer import apply_shares
from ami_janitor.core.model import (
    Copy,
    Image,
    LaunchPermission,
    LedgerCopy,
    LedgerItem,
    LedgerStage,
    RegionInventory,
    iso,
    with_ledger,
)
from ami_janitor.core.planner import plan
from ami_janitor.core.policy import (
    CANDIDATE_TAG,
    COPY_GENERATION_TAG_PREFIX,
    SHARED_BY_JANITOR_TAG,
    SOURCE_CREATED_TAG,
    SOURCE_IMAGE_TAG,
    SOURCE_REGION_TAG,
    Policy,
    parse_policy,
)
from ami_janitor.core.replication import (
    MAX_COPY_GENERATIONS,
    client_token,
    copies_of_new_source,
    handle_failed_replica,
    is_usable,
    ledger_copy,
    plan_copies,
    plan_replication,
    rebuild_copy,
    replica_name,
)
from ami_janitor.core.sharing import plan_shares
from builders import NOW
from fake_ec2 import FakeLedger

US, EU, WEST = "us-east-1", "eu-west-1", "us-west-2"
KEY_US = "arn:aws:kms:us-east-1:111122223333:key/us"
KEY_EU = "arn:aws:kms:eu-west-1:111122223333:key/eu"


def make_policy(
    keep: int, targets: list[dict[str, str]], share_with: tuple[str, ...] = (), public: bool = False
) -> Policy:
    return parse_policy(
        {
            "mode": "enforce",
            "regions": [US],
            "families": [
                {
                    "name": "app",
                    "match": {"name": "app-*"},
                    "latest": {"tag": "Latest"},
                    "replicate": targets,
                    "keep_latest": keep,
                    "share_with": {"accounts": list(share_with)},
                    "public": public,
                }
            ],
        }
    )


# Parsed once: a policy costs more to validate than a whole example.
REPLICATING = [
    make_policy(2, [{"region": EU, "kms_key_id": KEY_EU}]),
    make_policy(1, [{"region": EU}, {"region": WEST}]),
    make_policy(3, [{"region": US, "kms_key_id": KEY_US}, {"region": EU}]),
    make_policy(2, [{"region": US}, {"region": EU, "kms_key_id": KEY_EU}]),
]
ACCOUNTS = ("111111111111", "222222222222", "333333333333", "444444444444")
SHARING = [
    make_policy(2, [], share_with=ACCOUNTS[:2]),
    make_policy(2, [], share_with=ACCOUNTS[1:3], public=True),
    make_policy(2, [], share_with=()),
    make_policy(2, [], share_with=(ACCOUNTS[3],), public=False),
]


def error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}}, "Fake")


# ---- the in-memory account ------------------------------------------------------------------------


@dataclass
class Account:
    regions: dict[str, FakeEc2] = field(default_factory=dict)
    ledgers: dict[str, FakeLedger] = field(default_factory=dict)
    # EC2 remembers a ClientToken (per region), even after its copy is gone.
    tokens: dict[tuple[str, str], str] = field(default_factory=dict)
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    copies_made: int = 0

    def region(self, name: str) -> FakeEc2:
        if name not in self.regions:
            self.regions[name] = FakeEc2(self, name)
        return self.regions[name]

    def new_id(self) -> str:
        return f"ami-{next(self.ids):017x}"

    def ledger(self, name: str) -> FakeLedger:
        return self.ledgers.setdefault(name, FakeLedger())  # no EC2 behind it: no faults

    def ledger_for(self, name: str) -> Ledger:
        return cast(Ledger, self.ledger(name))

    def freeze(self) -> None:
        for region in self.regions.values():
            region.frozen = copying.deepcopy(region.images)
        for book in self.ledgers.values():
            book.frozen = dict(book.items)

    def thaw(self) -> None:
        for region in self.regions.values():
            region.frozen = None
        for book in self.ledgers.values():
            book.frozen = None

    def clients_for(self, region: str) -> RegionClients:
        return cast(RegionClients, Clients(self.region(region)))

    def inventory(self, region: str, *, permissions: bool = False) -> RegionInventory:
        fake = self.region(region)
        images = [Image.from_api(region, fake.api(raw)) for raw in fake.images.values()]
        if permissions:
            images = [
                i.model_copy(
                    update={
                        "launch_permissions": tuple(
                            LaunchPermission.from_key(k) for k in sorted(fake.images[i.image_id]["Perms"])
                        )
                    }
                )
                for i in images
            ]
        ordered = tuple(sorted(images, key=lambda i: i.image_id))
        return with_ledger(RegionInventory(region=region, images=ordered, ledger=self.ledger(region).view()))

    def read(self, region: str, image_id: str) -> Image | None:
        """The AMI as EC2 describes it, with its ledger item (what the worker reads)."""
        fake = self.region(region)
        view = fake.frozen if fake.frozen is not None else fake.images
        raw = view.get(image_id)
        if not raw:
            return None
        items = self.ledger(region).read_items([image_id])
        return Image.from_api(region, fake.api(raw)).model_copy(update={"ledger": items.get(image_id)})


@dataclass
class Clients:
    ec2: FakeEc2

    @property
    def region(self) -> str:
        return self.ec2.region


class FakeEc2:
    def __init__(self, account: Account, region: str) -> None:
        self.account = account
        self.region = region
        self.images: dict[str, dict[str, Any]] = {}
        self.frozen: dict[str, dict[str, Any]] | None = None

    def add(self, name: str, minutes_old: float, **fields: Any) -> dict[str, Any]:
        raw = {
            "ImageId": fields.pop("image_id", None) or self.account.new_id(),
            "Name": name,
            "Architecture": fields.pop("arch", "x86_64"),
            "State": fields.pop("state", "available"),
            "CreationDate": iso(NOW - timedelta(minutes=minutes_old)),
            "Tags": dict(fields.pop("tags", {})),
            "Encrypted": fields.pop("encrypted", False),
            "Perms": set(fields.pop("perms", ())),
            "DeprecationTime": fields.pop("deprecation_time", None),
            "SourceImageId": fields.pop("source_image_id", None),
            "SourceImageRegion": fields.pop("source_region", None),
        }
        assert not fields, fields
        self.images[raw["ImageId"]] = raw
        return raw

    @staticmethod
    def api(raw: dict[str, Any]) -> dict[str, Any]:
        answer = {
            "ImageId": raw["ImageId"],
            "Name": raw["Name"],
            "Architecture": raw["Architecture"],
            "State": raw["State"],
            "CreationDate": raw["CreationDate"],
            "Tags": [{"Key": k, "Value": v} for k, v in raw["Tags"].items()],
            "Public": "group:all" in raw["Perms"],
            "RootDeviceType": "ebs",
            "BlockDeviceMappings": [
                {
                    "Ebs": {
                        "SnapshotId": "snap-" + raw["ImageId"][4:],
                        "VolumeSize": 8,
                        "Encrypted": raw["Encrypted"],
                    }
                }
            ],
        }
        if raw["DeprecationTime"]:
            answer["DeprecationTime"] = raw["DeprecationTime"]
        if raw["SourceImageId"]:
            answer["SourceImageId"] = raw["SourceImageId"]
            answer["SourceImageRegion"] = raw["SourceImageRegion"]
        return answer

    # -- the calls ---------------------------------------------------------------------------------
    def describe_images(self, **params: Any) -> dict[str, Any]:
        view = self.frozen if self.frozen is not None else self.images
        filters = {f["Name"]: set(f["Values"]) for f in params.get("Filters", [])}
        sources = filters.pop("source-image-id", None)
        wanted = {name.removeprefix("tag:"): values for name, values in filters.items()}
        ids = params.get("ImageIds")
        found = [
            self.api(raw)
            for raw in view.values()
            if all(raw["Tags"].get(key) in values for key, values in wanted.items())
            and (sources is None or raw["SourceImageId"] in sources)
            and (ids is None or raw["ImageId"] in ids)
        ]
        return {"Images": found}

    def create_tags(self, Resources: list[str], Tags: list[dict[str, str]]) -> None:
        for image_id in Resources:
            self.images[image_id]["Tags"].update({t["Key"]: t["Value"] for t in Tags})

    def delete_tags(self, Resources: list[str], Tags: list[dict[str, str]]) -> None:
        for image_id in Resources:
            for tag in Tags:
                self.images[image_id]["Tags"].pop(tag["Key"], None)

    def copy_image(self, **request: Any) -> dict[str, str]:
        token = (self.region, request["ClientToken"])
        if token in self.account.tokens:
            return {"ImageId": self.account.tokens[token]}
        source = self.account.region(request["SourceRegion"]).images.get(request["SourceImageId"])
        if source is None or source["State"] != "available":
            raise error("InvalidAMIID.Unavailable")
        if any(raw["Name"] == request["Name"] for raw in self.images.values()):
            raise error("InvalidAMIName.Duplicate")
        specs = {s["ResourceType"]: s["Tags"] for s in request["TagSpecifications"]}
        raw = self.add(
            request["Name"],
            0,
            arch=source["Architecture"],
            state="pending",
            tags={t["Key"]: t["Value"] for t in specs["image"]},
            encrypted=source["Encrypted"] or bool(request.get("Encrypted")),
            source_image_id=request["SourceImageId"],
            source_region=request["SourceRegion"],
        )
        self.account.tokens[token] = raw["ImageId"]
        self.account.copies_made += 1
        return {"ImageId": raw["ImageId"]}

    def describe_image_attribute(self, ImageId: str, Attribute: str) -> dict[str, Any]:
        assert Attribute == "launchPermission"
        return {
            "ImageId": ImageId,
            "LaunchPermissions": [_api(key) for key in sorted(self.images[ImageId]["Perms"])],
        }

    def modify_image_attribute(self, ImageId: str, LaunchPermission: dict[str, list[dict[str, str]]]) -> None:
        perms = self.images[ImageId]["Perms"]
        for item in LaunchPermission.get("Add", []):
            perms.add(_key(item))
        for item in LaunchPermission.get("Remove", []):
            perms.discard(_key(item))


def _key(item: dict[str, str]) -> str:
    return LaunchPermission.from_api(item).key


def _api(key: str) -> dict[str, str]:
    return dict(LaunchPermission.from_key(key).to_api())


# ---- replication fleets ---------------------------------------------------------------------------

SOURCE_STATES = ["available", "available", "available", "pending", "failed", "disabled"]
# What a target already holds for a source: nothing, a copy in some state, a failed one, one gone
# (deregistered by hand), one the janitor retired, or one it retired whose item has since expired
# (retention_days: the target's ledger no longer names it, while EC2 may still remember its token).
EXISTING = [None, None, "pending", "available", "disabled", "failed", "gone", "retired", "expired"]


@dataclass
class Fleet:
    account: Account
    policy: Policy
    sources: list[str]
    broken: set[str]

    def inventories(self) -> list[RegionInventory]:
        regions = {US, EU, WEST}
        return [
            RegionInventory(region=r, error="ec2:DescribeImages: Throttling")
            if r in self.broken
            else self.account.inventory(r)
            for r in sorted(regions)
        ]

    def targets(self) -> list[tuple[str, str | None]]:
        return [(t.region, t.kms_key_id) for t in self.policy.families[0].replicate]

    def usable(self, source_id: str, region: str) -> int:
        images = self.account.inventory(region).images
        return sum(1 for i in images if i.source_image_id == source_id and is_usable(i))


def seed_copy(
    account: Account,
    policy: Policy,
    source: dict[str, Any],
    region: str,
    state: str,
    generation: int,
    recorded: bool,
) -> None:
    """A target's earlier history with `source`: its copies of generations 1..generation (the last in
    `state`, the earlier ones gone), with EC2's memory of their tokens and the ledgers' records (the
    copy's always; the source's unless `recorded` is False, with the copy's id once the copy's item
    records it; a retired copy's item records its deregistration, an expired one's is gone)."""
    image = Image.from_api(US, FakeEc2.api(source))
    family = policy.families[0]
    target = next(t for t in family.replicate if t.region == region)
    fake = account.region(region)
    for g in range(1, generation + 1):
        copy = Copy(
            family="app",
            source_image_id=source["ImageId"],
            source_region=US,
            region=region,
            kms_key_id=target.kms_key_id,
            generation=g,
        )
        copy_id = account.new_id()
        record = ledger_copy(copy, image)
        if recorded:
            account.ledger(US).record_copy(record)
        account.ledger(region).record_replica(copy_id, record)
        if recorded:
            account.ledger(US).confirm_copy(record, copy_id)
        if g == generation and state in ("retired", "expired"):
            retire(account, region, copy_id)
        if g == generation and state == "expired":
            del account.ledger(region).items[copy_id]
        if g == generation and state not in ("gone", "retired", "expired"):
            tags = {
                SOURCE_IMAGE_TAG: source["ImageId"],
                SOURCE_REGION_TAG: US,
                SOURCE_CREATED_TAG: iso(image.created) or "",
                COPY_GENERATION_TAG_PREFIX + region: str(g),
            }
            fake.add(
                replica_name(image, copy, family),
                1,
                image_id=copy_id,
                state=state,
                tags=tags,
                arch=source["Architecture"],
                source_image_id=source["ImageId"],
                source_region=US,
            )
        account.tokens[(region, client_token(copy))] = copy_id


@st.composite
def fleets(draw: st.DrawFn) -> Fleet:
    account = Account()
    policy = draw(st.sampled_from(REPLICATING))
    us = account.region(US)
    sources: list[str] = []
    for n in range(draw(st.integers(1, 6))):
        deprecated = draw(st.booleans()) and draw(st.booleans())
        raw = us.add(
            f"app-{n}",
            minutes_old=draw(st.integers(0, 10_000)) + n / 10,
            arch=draw(st.sampled_from(["x86_64", "arm64"])),
            state=draw(st.sampled_from(SOURCE_STATES)),
            encrypted=draw(st.booleans()),
            deprecation_time=iso(NOW - timedelta(days=1)) if deprecated else None,
        )
        sources.append(raw["ImageId"])
        for region, _key_id in [(t.region, t.kms_key_id) for t in policy.families[0].replicate]:
            state = draw(st.sampled_from(EXISTING))
            if state is not None:
                generation = (
                    draw(st.integers(1, 4)) if state in ("failed", "gone", "retired", "expired") else 1
                )
                # The code records every generation before it copies; only a failed copy (which carries its
                # own generation) is also tried with the source's record lost.
                recorded = state != "failed" or draw(st.booleans())
                seed_copy(account, policy, raw, region, state, generation, recorded)
    broken = {EU} if draw(st.integers(0, 5)) == 0 else set()
    return Fleet(account, policy, sources, broken)


def retire(account: Account, region: str, copy_id: str) -> None:
    """The janitor deregisters a copy: it is gone, its item records the deregistration (EC2 keeps its
    token)."""
    account.region(region).images.pop(copy_id, None)
    book = account.ledger(region)
    item = book.items.get(copy_id) or LedgerItem(image_id=copy_id)
    stages = {"deregister": LedgerStage(at=NOW, confirmed=NOW)}
    book.items[copy_id] = item.model_copy(
        update={"first_candidate": NOW, "stages": stages, "deregistered": NOW}
    )


def as_available(inventory: RegionInventory) -> RegionInventory:
    """The region once its copies in flight are available (what the janitor plans against)."""
    images = tuple(
        i.model_copy(update={"state": "available"}) if i.is_replica and i.state == "pending" else i
        for i in inventory.images
    )
    return inventory._replace(images=images)


def kept_by_its_group(inventory: RegionInventory, image_id: str, policy: Policy) -> bool:
    """The region's plan keeps the AMI by its group's order: among the keep_latest newest, or its Latest."""
    decision = next(d for d in plan([inventory], policy, NOW).decisions if d.image_id == image_id)
    return any(r.startswith("among the ") or r == "Latest of its group" for r in decision.reasons)


def with_copy(inventory: RegionInventory, source: Image) -> tuple[RegionInventory, str]:
    """The region with an available copy of `source` the janitor made (as EC2 and its ledger show it)."""
    copy_id = f"ami-{'f' * 17}"
    record = LedgerCopy(
        source_image_id=source.image_id,
        source_region=source.region,
        region=inventory.region,
        token="hypothetical",
        source_created=source.created,
    )
    copy = source.model_copy(
        update={
            "image_id": copy_id,
            "region": inventory.region,
            "deprecation_time": None,
            "copied_from": source.image_id,
            "copied_from_region": source.region,
            "ledger": LedgerItem(image_id=copy_id, replica=record),
        }
    )
    return inventory._replace(images=(*inventory.images, copy)), copy_id


def copyable(fleet: Fleet, source: Image, region: str, key: str | None) -> bool:
    """The policy copies `source` to `region` (a same-region target only with a key, and only for an
    unencrypted source), and the target's inventory can be read."""
    if region in fleet.broken or source.state != "available" or source.is_replica:
        return False
    return region != source.region or (key is not None and not source.encrypted)


def check_agreement(fleet: Fleet, started: list[tuple[str, str]], problems: list[str]) -> None:
    """What replication copies and what each target keeps agree: every copy started is kept by its group
    there once available (never a candidate), and every source left without a copy would not be (unless
    its copy was given up: a copy given up holds its place)."""
    policy = fleet.policy
    for region, copy_id in started:
        assert kept_by_its_group(as_available(fleet.account.inventory(region)), copy_id, policy), copy_id
    for region, key in fleet.targets():
        target = as_available(fleet.account.inventory(region))
        sources = [i for i in fleet.account.inventory(US).images if copyable(fleet, i, region, key)]
        given_up = {i.architecture for i in sources if bounded(problems, i.image_id, region)}
        for source in sources:
            if source.architecture in given_up or fleet.usable(source.image_id, region):
                continue
            extended, copy_id = with_copy(target, source)
            assert not kept_by_its_group(extended, copy_id, policy), (source.image_id, region)


def failures_recorded(fleet: Fleet, source_id: str, region: str) -> int:
    """The copies of `source_id` the target's ledger records that the janitor did not retire."""
    items = fleet.account.ledger(region).items.values()
    return sum(
        1
        for i in items
        if i.replica is not None and i.replica.source_image_id == source_id and "deregister" not in i.stages
    )


def run_copies(fleet: Fleet, copies: list[Copy]) -> list[tuple[str, str]]:
    """Start each copy; the (region, image) of each copy started."""
    started: list[tuple[str, str]] = []
    for copy in copies:
        source = fleet.account.read(copy.source_region, copy.source_image_id)
        assert source is not None
        result = start_copy(
            fleet.account.clients_for, copy, source, fleet.policy, ledger_for=fleet.account.ledger_for
        )
        assert result.status in ("ok", "skipped"), result
        if result.status == "ok":
            made = fleet.account.read(copy.region, result.image_id or "")
            # A reused token would answer with a failed or gone copy.
            assert made is not None and is_usable(made), (copy, result)
        if result.started:
            started.append((copy.region, result.image_id or ""))
    return started


def bounded(problems: list[str], source_id: str, region: str) -> bool:
    return any(source_id in p and f"to {region} not started again" in p for p in problems)


@given(fleets())
def test_planned_copies_are_exactly_those_each_target_keeps_and_converge(fleet: Fleet) -> None:
    copies, problems = plan_replication(fleet.inventories(), fleet.policy, NOW)
    event(
        f"copies planned: {min(len(copies), 3)}; given up: {any('not started again' in p for p in problems)}"
    )
    event(f"retries planned: {any(c.generation > 1 for c in copies)}")
    assert len({(c.source_image_id, c.region) for c in copies}) == len(copies)
    for copy in copies:
        assert fleet.usable(copy.source_image_id, copy.region) == 0
    started = run_copies(fleet, copies)
    check_agreement(fleet, started, problems)
    for source_id in fleet.sources:
        for region, _ in fleet.targets():
            assert fleet.usable(source_id, region) <= 1
            if bounded(problems, source_id, region):
                # Copies the janitor retired are no failures.
                assert failures_recorded(fleet, source_id, region) >= MAX_COPY_GENERATIONS
    again, problems_again = plan_replication(fleet.inventories(), fleet.policy, NOW)
    assert again == []
    assert problems_again == problems


@given(fleets())
def test_the_worker_rebuilds_every_request_the_janitor_sends_as_it_is(fleet: Fleet) -> None:
    """What the scheduled run and the available event queue passes the worker's checks unchanged (also
    where the source lost its generation record and only a failed copy carries it)."""
    family = fleet.policy.families[0]
    sources = [i for i in fleet.account.inventory(US).images if not i.is_replica and i.state == "available"]
    sent = plan_copies(fleet.inventories(), fleet.policy, NOW)
    sent += [copy for source in sources for copy in copies_of_new_source(source, family)]
    for copy in sent:
        source = fleet.account.read(copy.source_region, copy.source_image_id)
        assert source is not None
        ec2 = fleet.account.clients_for(copy.region).ec2
        existing = find_copies(ec2, fleet.account.ledger_for(copy.region), copy.source_image_id, copy.region)
        assert rebuild_copy(copy, source, fleet.policy, existing) == copy


# ---- duplicated, reordered and racing requests ------------------------------------------------------


@given(fleets(), st.data())
def test_duplicate_and_racing_requests_never_make_two_copies(fleet: Fleet, data: st.DataObject) -> None:
    account = fleet.account
    queue: list[Copy] = plan_copies(fleet.inventories(), fleet.policy, NOW)
    for _ in range(data.draw(st.integers(0, 25))):
        if not queue:
            break
        step = data.draw(st.sampled_from(["deliver", "race", "duplicate", "fail", "retire", "deregister"]))
        if step == "duplicate":
            queue.append(data.draw(st.sampled_from(queue)))
        elif step in ("deliver", "race"):
            first = data.draw(st.sampled_from(queue))
            pair = [first, data.draw(st.sampled_from(queue))] if step == "race" else [first]
            if step == "race":
                account.freeze()  # both workers read before either writes
            try:
                for copy in pair:
                    source = account.read(copy.source_region, copy.source_image_id)
                    assert source is not None
                    result = start_copy(
                        account.clients_for, copy, source, fleet.policy, ledger_for=account.ledger_for
                    )
                    assert result.status in (
                        "ok",
                        "skipped",
                    )
            finally:
                account.thaw()
        else:
            replicas = [
                raw
                for region, _ in fleet.targets()
                for raw in account.region(region).images.values()
                if SOURCE_IMAGE_TAG in raw["Tags"] and raw["State"] in ("pending", "available")
            ]
            if not replicas:
                continue
            raw = data.draw(st.sampled_from(replicas))
            region = next(r for r, _ in fleet.targets() if raw["ImageId"] in account.region(r).images)
            if step == "retire":
                retire(account, region, raw["ImageId"])
            elif step == "deregister":
                del account.region(region).images[raw["ImageId"]]  # by hand; EC2 keeps its token
            else:
                raw["State"] = "failed"
                replica = account.read(region, raw["ImageId"])
                assert replica is not None
                retry = handle_failed_replica(replica, fleet.policy)
                if retry.copy is not None:
                    queue.append(retry.copy)
        for source_id in fleet.sources:
            for region, _ in fleet.targets():
                assert fleet.usable(source_id, region) <= 1
    # The scheduled reconcile repairs whatever the events left (the events copy without asking the
    # target: a copy they made may be one its group does not keep).
    copies, problems = plan_replication(fleet.inventories(), fleet.policy, NOW)
    check_agreement(fleet, run_copies(fleet, copies), problems)
    assert plan_copies(fleet.inventories(), fleet.policy, NOW) == []


# ---- shares -----------------------------------------------------------------------------------------

GRANTS = [f"user:{a}" for a in ACCOUNTS] + ["group:all"]


@st.composite
def shared_fleets(draw: st.DrawFn) -> tuple[Account, Policy, bool]:
    account = Account()
    policy = draw(st.sampled_from(SHARING))
    for region in draw(st.sampled_from([[US], [US, EU]])):
        fake = account.region(region)
        for n in range(draw(st.integers(1, 5))):
            recorded = draw(st.sets(st.sampled_from(GRANTS)))
            foreign = draw(st.sets(st.sampled_from(GRANTS)))
            tags = (
                {SHARED_BY_JANITOR_TAG: ",".join(sorted(recorded))} if recorded or draw(st.booleans()) else {}
            )
            candidate = draw(st.integers(0, 4)) == 0  # the janitor's clock runs on it
            if draw(st.integers(0, 4)) == 0:
                tags[CANDIDATE_TAG] = iso(NOW) or ""  # a tag alone: no clock, says nothing
            raw = fake.add(
                f"app-{n}",
                n,
                state=draw(st.sampled_from(["available", "available", "disabled", "pending"])),
                tags=tags,
                perms=recorded | foreign,
            )
            if recorded:
                account.ledger(region).record_grants(raw["ImageId"], recorded)
            if candidate:
                ledger = account.ledger(region)
                item = ledger.items.get(raw["ImageId"]) or LedgerItem(image_id=raw["ImageId"])
                ledger.items[raw["ImageId"]] = item.model_copy(update={"first_candidate": NOW})
    return account, policy, draw(st.booleans())


def managed(image: Image) -> bool:
    clock = image.ledger is not None and image.ledger.is_open
    return image.state == "available" and not clock


@given(shared_fleets())
def test_applied_shares_converge_and_nothing_is_public_unless_allowed(
    case: tuple[Account, Policy, bool],
) -> None:
    account, policy, loaded = case
    family = policy.families[0]
    before = {r: account.inventory(r, permissions=True) for r in account.regions}
    inventories = [account.inventory(r, permissions=loaded) for r in sorted(account.regions)]
    shares = plan_shares(inventories, policy, NOW)
    results = apply_shares(account.clients_for, shares, inventories, account.ledger_for)
    assert [r.status for r in results] == ["ok"] * len(shares)
    after = [account.inventory(r, permissions=loaded) for r in sorted(account.regions)]
    assert plan_shares(after, policy, NOW) == []
    desired = {f"user:{a}" for a in family.share_with.accounts} | ({"group:all"} if family.public else set())
    for region in sorted(account.regions):
        old = {i.image_id: i for i in before[region].images}
        for image in account.inventory(region, permissions=True).images:
            grants = {p.key for p in image.launch_permissions or ()}
            was = {p.key for p in old[image.image_id].launch_permissions or ()}
            if not managed(image):
                assert grants == was  # left to the stages
                continue
            assert image.public == family.public
            assert desired <= grants
            # Only what the ledger records the janitor granted (or the public group) may have gone.
            gone = was - grants
            ledger = old[image.image_id].ledger
            assert gone <= set(ledger.grants if ledger else ()) | {"group:all"}
            # A grant that was in place is never taken for the janitor's own (it would revoke it later).
            own = set(image.ledger.grants if image.ledger else ())
            assert not (own - set(ledger.grants if ledger else ())) & was
