"""The executor applies plans against the emulator (moto + the demo emulator) with a moto-backed ledger
and, for what moto lacks or gets wrong, against botocore's Stubber with the exact requests EC2 and
DynamoDB would receive. Every decision believes the ledger; tags are a mirror, never read back."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
import yaml
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from botocore.stub import Stubber
from moto import mock_aws

from ami_janitor.aws import ledger as ledger_table
from ami_janitor.aws.clients import RegionClients
from ami_janitor.aws.executor import (
    PERMISSIONS,
    ActionResult,
    ApplyResult,
    apply_plan,
    apply_stages,
    deprecate_at,
    permission_tags,
    recorded_permissions,
    rescue_image,
)
from ami_janitor.aws.ledger import Ledger, Prior
from ami_janitor.core import trust
from ami_janitor.core.model import (
    Decision,
    Image,
    LaunchPermission,
    LedgerItem,
    LedgerSnapshot,
    LedgerStage,
    LedgerView,
    Plan,
    RegionInventory,
    RegionStatus,
    RetiredSnapshot,
    Stage,
    iso,
    with_ledger,
)
from ami_janitor.core.policy import (
    CANDIDATE_TAG,
    PRIOR_DEPRECATION_TAG,
    PRIOR_PERMISSIONS_TAG,
    RETIRED_FROM_TAG,
    parse_policy,
)
from ami_janitor.demo import emulator
from builders import ledger_write
from sdk_faults import LoseFirstAnswers
from server import POLICY

REGION = "us-east-1"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
TABLE = "ami-janitor-ledger"
WRITER = "arn:aws:iam::123456789012:user/moto"
ALL_STAGES: list[Stage] = ["deprecate", "disable", "deregister"]
ZERO_DAYS: list[tuple[Stage, int]] = [(stage, 0) for stage in ALL_STAGES]
# A day ahead of the wall clock, so DeprecateAt is computed from it alone (deterministic).
NOW = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
EARLIER = NOW - timedelta(days=10)
LATER = NOW + timedelta(hours=1)
FIXED_NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
ACCOUNT_A, ACCOUNT_B = "111122223333", "444455556666"
ORG = "arn:aws:organizations::123456789012:organization/o-abc123"


# ---- helpers: an emulated fleet, its ledger, inventories and hand-built plans ----------------------


def dynamodb() -> Any:
    return boto3.client("dynamodb", region_name=REGION, **CREDENTIALS)


def make_table(*, adopted: datetime | None = EARLIER) -> None:
    """The region's ledger table (what `ami-janitor ledger create` makes); by default a region whose
    janitor tags an earlier run already adopted."""
    ledger_table.create_table(RegionClients(REGION, dynamodb=dynamodb()), TABLE, [WRITER])
    if adopted is not None:
        assert (
            Ledger(RegionClients(REGION, dynamodb=dynamodb()), TABLE).record_adoption(adopted) == "recorded"
        )


@pytest.fixture
def ec2(fake_aws_env: None) -> Iterator[Any]:
    emulator.install()
    with mock_aws():
        make_table()
        yield boto3.client("ec2", region_name=REGION, **CREDENTIALS)


def ledger_of(ec2: Any, db: Any = None) -> Ledger:
    return Ledger(RegionClients(REGION, ec2=ec2, dynamodb=db if db is not None else dynamodb()), TABLE)


def items_of(ec2: Any) -> dict[str, LedgerItem]:
    return ledger_of(ec2).read_all().items


def make_image(ec2: Any, name: str, share_with: Sequence[dict[str, str]] = ()) -> str:
    instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]
    image_id: str = ec2.create_image(InstanceId=instance["InstanceId"], Name=name)["ImageId"]
    if share_with:
        ec2.modify_image_attribute(ImageId=image_id, LaunchPermission={"Add": list(share_with)})
    return image_id


def snapshot_of(ec2: Any, image_id: str) -> str:
    raw = ec2.describe_images(ImageIds=[image_id])["Images"][0]
    return str(raw["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"])


def load_inventory(ec2: Any) -> RegionInventory:
    """What the inventory reads: the region's AMIs, snapshots marked retired-from, and the ledger, each
    AMI carrying its ledger item."""
    raw = ec2.describe_images(Owners=["self"], IncludeDeprecated=True, IncludeDisabled=True)["Images"]
    retired = ec2.describe_snapshots(
        OwnerIds=["self"], Filters=[{"Name": "tag-key", "Values": [RETIRED_FROM_TAG]}]
    )["Snapshots"]
    return with_ledger(
        RegionInventory(
            region=REGION,
            images=tuple(Image.from_api(REGION, r) for r in raw),
            retired_snapshots=tuple(
                RetiredSnapshot(snapshot_id=s["SnapshotId"], image_id=_tags(s)[RETIRED_FROM_TAG])
                for s in retired
            ),
            ledger=ledger_of(ec2).read_all(),
        )
    )


def image_in(inventory: RegionInventory, image_id: str) -> Image:
    return next(i for i in inventory.images if i.image_id == image_id)


def _tags(raw: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in raw.get("Tags") or []}


def decision(image_id: str, action: str, stages: Sequence[str] = (), family: str = "web") -> Decision:
    return Decision.model_validate(
        {
            "region": REGION,
            "family": family,
            "architecture": "x86_64",
            "image_id": image_id,
            "name": image_id,
            "created": "2026-01-01T00:00:00Z",
            "action": action,
            "reasons": [],
            "stages": list(stages),
        }
    )


def planned(
    image: Image, configured: Sequence[tuple[Stage, int]] = ZERO_DAYS, now: datetime = NOW
) -> Decision:
    """A candidate's decision as the planner makes it: the stages due by the ledger."""
    due = trust.stage_plan(image, configured, now).due
    return decision(image.image_id, due[-1] if due else "wait", due)


def make_plan(decisions: Sequence[Decision], inventory: RegionInventory | None = None) -> Plan:
    """The plan; unfinished snapshots as the planner finds them: those the ledger recorded."""
    unfinished = [s.snapshot_id for s in trust.unfinished_snapshots(inventory)] if inventory else []
    return Plan(
        mode="enforce",
        generated_at=iso(NOW) or "",
        regions=[RegionStatus(region=REGION, status="ok")],
        decisions=list(decisions),
        unfinished_snapshots=unfinished,
    )


def clients_for(ec2: Any, db: Any = None) -> Callable[[str], RegionClients]:
    return lambda region: RegionClients(region, ec2=ec2, dynamodb=db if db is not None else dynamodb())


def apply(
    ec2: Any,
    decisions: Sequence[Decision],
    inventory: RegionInventory,
    family_grants: Mapping[str, Sequence[str]] | None = None,
    *,
    db: Any = None,
    now: datetime = NOW,
) -> ApplyResult:
    plan = make_plan(decisions, inventory)
    return apply_plan(
        plan,
        {REGION: inventory},
        clients_for(ec2, db),
        now,
        ledger_for=lambda region: ledger_of(ec2, db),
        # The families' grants, each AMI's family read off its name ("web-1": web).
        rescue_grants=(lambda image: family_grants[image.name.split("-")[0]]) if family_grants else None,
    )


def by_key(result: ApplyResult) -> dict[tuple[str, str], ActionResult]:
    return {(r.image_id, r.action): r for r in result.results}


def image_or_none(ec2: Any, image_id: str) -> dict[str, Any] | None:
    images = ec2.describe_images(Owners=["self"])["Images"]
    return next((i for i in images if i["ImageId"] == image_id), None)


def permissions_of(ec2: Any, image_id: str) -> list[dict[str, str]]:
    answer = ec2.describe_image_attribute(ImageId=image_id, Attribute="launchPermission")
    return sorted(answer["LaunchPermissions"], key=lambda p: sorted(p.items()))


def snapshot_ids(ec2: Any) -> set[str]:
    return {s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]}


READS = ("Describe", "Get", "List", "Scan", "Query", "BatchGet")


class CallLog:
    """Records the calls of one or more clients (EC2, DynamoDB) in one order: (operation, parameters)."""

    def __init__(self, *clients: Any) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        for client in clients:
            service = client.meta.service_model.service_name
            client.meta.events.register(f"before-parameter-build.{service}", self._record)

    def _record(self, model: Any, params: dict[str, Any], **_: Any) -> None:
        self.calls.append((model.name, params))

    def changes(self) -> list[str]:
        """The operations that change something (reads left out)."""
        return [name for name, _ in self.calls if not name.startswith(READS)]

    def index(self, operation: str, predicate: Callable[[dict[str, Any]], bool] = lambda _: True) -> int:
        for position, (name, params) in enumerate(self.calls):
            if name == operation and predicate(params):
                return position
        raise AssertionError(f"no {operation} call matched")

    def count(self, operation: str, predicate: Callable[[dict[str, Any]], bool] = lambda _: True) -> int:
        return sum(1 for name, params in self.calls if name == operation and predicate(params))


def writes(image_id: str, expression: str) -> Callable[[dict[str, Any]], bool]:
    """An UpdateItem on the AMI's ledger item whose update expression starts with `expression`."""
    return lambda p: bool(
        p["Key"]["pk"]["S"] == f"image#{image_id}" and _recorded(p["UpdateExpression"]).startswith(expression)
    )


def _recorded(expression: str) -> str:
    """An update expression without the write id every ledger write adds to it."""
    if expression.startswith("SET #last_write = :last_write, "):
        return "SET " + expression.removeprefix("SET #last_write = :last_write, ")
    return expression.removeprefix("SET #last_write = :last_write ")


def stage_write(image_id: str, stage: Stage) -> Callable[[dict[str, Any]], bool]:
    """The UpdateItem that records `stage` before its change."""
    return lambda p: bool(
        writes(image_id, "SET stages.#stage = :entry")(p) and p["ExpressionAttributeNames"]["#stage"] == stage
    )


def stage_confirm(image_id: str, stage: Stage) -> Callable[[dict[str, Any]], bool]:
    return lambda p: bool(
        writes(image_id, "SET stages.#stage.confirmed")(p)
        and p["ExpressionAttributeNames"]["#stage"] == stage
    )


def seed(
    book: Ledger, image_id: str, stages: Sequence[Stage] = (), *, at: datetime = EARLIER, **prior: Any
) -> None:
    """The ledger as an earlier run left it: the clock, then `stages` recorded (not confirmed)."""
    assert book.record_candidate(image_id, at) == "recorded"
    previous: Stage | None = None
    for stage in stages:
        written = book.record_stage(
            image_id,
            stage,
            at,
            Prior(deprecation=prior.get("deprecation"), launch_permissions=prior.get("permissions", ())),
            previous=previous,
            snapshots=prior.get("snapshots", ()),
        )
        assert written == "recorded"
        previous = stage


# ---- end to end against the emulator -------------------------------------------------------------


def test_permissions_are_the_sorted_actions() -> None:
    assert sorted(PERMISSIONS) == PERMISSIONS
    assert "ec2:DeregisterImage" in PERMISSIONS and "ec2:DeleteSnapshot" in PERMISSIONS


def test_all_stages_retire_an_image_and_only_its_unused_snapshots(ec2: Any) -> None:
    solo = make_image(ec2, "web-solo", share_with=[{"UserId": ACCOUNT_A}])
    pair_a, pair_b = make_image(ec2, "web-pair-a"), make_image(ec2, "web-pair-b")
    solo_snapshot, shared = snapshot_of(ec2, solo), snapshot_of(ec2, pair_a)
    emulator.set_image_fields(REGION, pair_b, snapshot_id=shared)  # registered from the same snapshot
    db = dynamodb()
    log = CallLog(ec2, db)

    result = apply(
        ec2,
        [decision(solo, "deregister", ALL_STAGES), decision(pair_a, "deregister", ALL_STAGES)],
        load_inventory(ec2),
        db=db,
    )

    assert result.failed == 0, result.results
    assert image_or_none(ec2, solo) is None and image_or_none(ec2, pair_a) is None
    assert image_or_none(ec2, pair_b) is not None
    assert solo_snapshot not in snapshot_ids(ec2) and shared in snapshot_ids(ec2)
    assert result.snapshots_deleted == [solo_snapshot]
    results = by_key(result)
    assert [results[(solo, stage)].status for stage in ALL_STAGES] == ["ok", "ok", "ok"]
    assert "kept: another AMI uses it" in (results[(pair_a, "deregister")].detail or "")
    # The shared snapshot is not pair-a's to delete: neither recorded nor marked, so no later run
    # deletes it as unfinished.
    assert _tags(ec2.describe_snapshots(SnapshotIds=[shared])["Snapshots"][0]) == {}
    items = items_of(ec2)
    assert items[solo].snapshots == (LedgerSnapshot(snapshot_id=solo_snapshot, image_id=solo),)
    assert items[pair_a].snapshots == ()
    for image_id in (solo, pair_a):
        item = items[image_id]
        assert item.first_candidate == NOW and item.deregistered == NOW and item.closed is None
        assert set(item.stages) == set(ALL_STAGES)
        assert item.stages["deprecate"].confirmed == NOW and item.stages["disable"].confirmed == NOW
        assert item.ttl == int((NOW + timedelta(days=90)).timestamp())
    assert items[solo].stages["disable"].prior_launch_permissions == (f"user:{ACCOUNT_A}",)

    # Each step is recorded in the ledger before its change, confirmed after it; the mirror tags
    # follow the ledger.
    def tags(key: str) -> Callable[[dict[str, Any]], bool]:
        return lambda p: solo in p["Resources"] and any(t["Key"] == key for t in p["Tags"])

    def on_solo(p: dict[str, Any]) -> bool:
        return bool(p["ImageId"] == solo)

    clock = log.index("UpdateItem", writes(solo, "SET image_id = :id, first_candidate"))
    assert (
        clock
        < log.index("CreateTags", tags(CANDIDATE_TAG))
        < log.index("UpdateItem", stage_write(solo, "deprecate"))
    )
    assert (
        log.index("UpdateItem", stage_write(solo, "deprecate"))
        < log.index("EnableImageDeprecation", on_solo)
        < log.index("UpdateItem", stage_confirm(solo, "deprecate"))
        < log.index("UpdateItem", stage_write(solo, "disable"))
        < log.index("DisableImage", on_solo)
        < log.index("UpdateItem", stage_confirm(solo, "disable"))
        < log.index("UpdateItem", stage_write(solo, "deregister"))
        < log.index("CreateTags", lambda p: p["Resources"] == [solo_snapshot])
        < log.index("DeregisterImage", on_solo)
        < log.index("DeleteSnapshot", lambda p: p["SnapshotId"] == solo_snapshot)
        < log.index("UpdateItem", writes(solo, "SET deregistered"))
    )
    # The stages' mirror tags are written once the run is done, on the AMIs still there: none here.
    for key in (PRIOR_DEPRECATION_TAG, PRIOR_PERMISSIONS_TAG):
        assert not any(tags(key)(params) for name, params in log.calls if name == "CreateTags"), key


def test_stages_record_what_they_change(ec2: Any) -> None:
    owner_deprecation = (NOW + timedelta(days=30)).replace(second=0)
    image_id = make_image(ec2, "web-1", share_with=[{"UserId": ACCOUNT_A}, {"OrganizationArn": ORG}])
    ec2.enable_image_deprecation(ImageId=image_id, DeprecateAt=owner_deprecation)

    result = apply(ec2, [decision(image_id, "disable", ["deprecate", "disable"])], load_inventory(ec2))

    assert result.failed == 0, result.results
    item = items_of(ec2)[image_id]
    assert item.first_candidate == NOW and item.closed is None and item.snapshots == ()
    assert item.stages == {
        "deprecate": LedgerStage(at=NOW, prior_deprecation=owner_deprecation, confirmed=NOW),
        "disable": LedgerStage(
            at=NOW, prior_launch_permissions=(f"org:{ORG}", f"user:{ACCOUNT_A}"), confirmed=NOW
        ),
    }
    raw = ec2.describe_images(ImageIds=[image_id])["Images"][0]
    # The tags mirror the ledger, for people.
    assert _tags(raw) == {
        CANDIDATE_TAG: iso(NOW),
        PRIOR_DEPRECATION_TAG: iso(owner_deprecation),
        PRIOR_PERMISSIONS_TAG: f"org:{ORG},user:{ACCOUNT_A}",
    }
    assert raw["State"] == "disabled"
    assert Image.from_api(REGION, raw).deprecation_time == deprecate_at(NOW)  # earlier than the owner's
    assert permissions_of(ec2, image_id) == []


def test_an_earlier_deprecation_is_kept_and_done_stages_are_not_planned_again(ec2: Any) -> None:
    image_id = make_image(ec2, "web-1")
    soon = deprecate_at(NOW) - timedelta(minutes=1)
    ec2.enable_image_deprecation(ImageId=image_id, DeprecateAt=soon)
    first = apply(ec2, [decision(image_id, "deprecate", ["deprecate"])], load_inventory(ec2))
    assert "kept the earlier deprecation time" in (by_key(first)[(image_id, "deprecate")].detail or "")
    assert ec2.describe_images(ImageIds=[image_id])["Images"][0]["DeprecationTime"].startswith(iso(soon)[:16])
    assert items_of(ec2)[image_id].stages["deprecate"].confirmed == NOW

    # The ledger says deprecate is done: the next plan has only the stages after it.
    two_stages: list[tuple[Stage, int]] = [("deprecate", 0), ("disable", 0)]
    again_decision = planned(image_in(load_inventory(ec2), image_id), two_stages)
    assert again_decision.stages == ["disable"]
    again = apply(ec2, [again_decision], load_inventory(ec2), now=LATER)
    assert [(r.action, r.status) for r in again.results] == [("disable", "ok")]
    assert items_of(ec2)[image_id].stages["deprecate"].at == NOW  # not recorded again
    assert planned(image_in(load_inventory(ec2), image_id), two_stages).stages == []


def test_rescue_undoes_every_stage_the_ledger_recorded(ec2: Any) -> None:
    many = [{"UserId": f"{n:012d}"} for n in range(100000000001, 100000000031)]  # three tag parts
    owner_deprecation = (NOW + timedelta(days=30)).replace(second=0)
    with_owner = make_image(ec2, "web-1", share_with=[*many, {"OrganizationArn": ORG}])
    ec2.enable_image_deprecation(ImageId=with_owner, DeprecateAt=owner_deprecation)
    plain = make_image(ec2, "web-2", share_with=[{"UserId": ACCOUNT_A}])
    ec2.create_tags(Resources=[with_owner, plain], Tags=[{"Key": "Project", "Value": "PetTracker"}])
    before = {i: permissions_of(ec2, i) for i in (with_owner, plain)}
    retire = [decision(i, "disable", ["deprecate", "disable"]) for i in (with_owner, plain)]
    assert apply(ec2, retire, load_inventory(ec2)).failed == 0
    assert (
        len([k for k in _tags(image_or_none(ec2, with_owner) or {}) if k.startswith(PRIOR_PERMISSIONS_TAG)])
        == 3
    )
    # A forged mirror tag adds an account: the rescue grants only what the ledger recorded.
    ec2.create_tags(Resources=[plain], Tags=[{"Key": PRIOR_PERMISSIONS_TAG, "Value": f"user:{ACCOUNT_B}"}])

    rescues = [decision(with_owner, "rescue"), decision(plain, "rescue", family="web2")]
    result = apply(ec2, rescues, load_inventory(ec2), now=LATER)

    assert result.failed == 0, result.results
    items = items_of(ec2)
    for image_id in (with_owner, plain):
        raw = image_or_none(ec2, image_id) or {}
        assert raw["State"] == "available"
        assert _tags(raw) == {"Project": "PetTracker"}  # janitor tags gone, others kept
        assert permissions_of(ec2, image_id) == before[image_id]
        # The clock is closed; what the stages recorded stays (until a new clock starts).
        assert items[image_id].closed == LATER and set(items[image_id].stages) == {"deprecate", "disable"}
    assert (image_or_none(ec2, with_owner) or {})["DeprecationTime"].startswith(iso(owner_deprecation)[:16])
    assert "DeprecationTime" not in (image_or_none(ec2, plain) or {})
    # A rescue of an image whose clock is closed changes nothing.
    again = apply(ec2, [decision(plain, "rescue")], load_inventory(ec2))
    assert [(r.status, r.detail) for r in again.results] == [
        ("skipped", "nothing to undo (the ledger records no stage)")
    ]
    assert items_of(ec2)[plain].closed == LATER


def test_a_rescue_makes_an_ami_public_only_where_its_family_is_public(ec2: Any) -> None:
    private = make_image(ec2, "web-1", share_with=[{"Group": "all"}, {"UserId": ACCOUNT_A}])
    public = make_image(ec2, "pub-1", share_with=[{"Group": "all"}, {"UserId": ACCOUNT_A}])
    retire = [decision(i, "disable", ["disable"]) for i in (private, public)]
    assert apply(ec2, retire, load_inventory(ec2)).failed == 0
    assert all(permissions_of(ec2, i) == [] for i in (private, public))

    grants = {"web": [f"user:{ACCOUNT_A}"], "pub": ["group:all", f"user:{ACCOUNT_A}"]}
    rescues = [decision(private, "rescue"), decision(public, "rescue", family="pub")]
    result = by_key(apply(ec2, rescues, load_inventory(ec2), family_grants=grants))

    assert permissions_of(ec2, private) == [{"UserId": ACCOUNT_A}]
    assert "not restored (public: true not set): group:all" in (result[(private, "rescue")].detail or "")
    assert permissions_of(ec2, public) == [{"Group": "all"}, {"UserId": ACCOUNT_A}]
    assert result[(public, "rescue")].status == "ok"


def test_a_rescue_does_not_grant_again_what_share_with_no_longer_lists(ec2: Any) -> None:
    # The janitor granted ACCOUNT_A (its ledger says so); ACCOUNT_B was granted by hand. The AMI is
    # disabled, then ACCOUNT_A is removed from share_with, then a keep reason returns.
    image_id = make_image(ec2, "web-1", share_with=[{"UserId": ACCOUNT_A}, {"UserId": ACCOUNT_B}])
    ledger_of(ec2).record_grants(image_id, [f"user:{ACCOUNT_A}"])
    assert apply(ec2, [decision(image_id, "disable", ["disable"])], load_inventory(ec2)).failed == 0

    rescued = apply(ec2, [decision(image_id, "rescue")], load_inventory(ec2), family_grants={"web": []})

    # The owner's grant comes back; the janitor's own grant the policy withdrew does not, and says why.
    assert permissions_of(ec2, image_id) == [{"UserId": ACCOUNT_B}]
    detail = by_key(rescued)[(image_id, "rescue")].detail or ""
    assert f"not restored (no longer in share_with): user:{ACCOUNT_A}" in detail
    # By hand, the same: the policy's families decide what a rescue may grant again.
    other = make_image(ec2, "web-2", share_with=[{"UserId": ACCOUNT_A}])
    ledger_of(ec2).record_grants(other, [f"user:{ACCOUNT_A}"])
    assert apply(ec2, [decision(other, "disable", ["disable"])], load_inventory(ec2)).failed == 0
    image = Image.from_api(REGION, ec2.describe_images(ImageIds=[other])["Images"][0])
    results = rescue_image(RegionClients(REGION, ec2=ec2, dynamodb=dynamodb()), ledger_of(ec2), image, NOW)
    assert [r.status for r in results] == ["ok"]
    assert permissions_of(ec2, other) == []


def test_rescue_image_reads_the_ledger_item_and_grants_what_it_recorded(ec2: Any) -> None:
    image_id = make_image(ec2, "web-1", share_with=[{"UserId": ACCOUNT_A}, {"Group": "all"}])
    assert apply(ec2, [decision(image_id, "disable", ["disable"])], load_inventory(ec2)).failed == 0
    ec2.create_tags(Resources=[image_id], Tags=[{"Key": PRIOR_PERMISSIONS_TAG, "Value": f"user:{ACCOUNT_B}"}])
    # As `ami-janitor rescue` finds it: described alone, without its ledger item.
    raw = ec2.describe_images(ImageIds=[image_id])["Images"][0]
    image = Image.from_api(REGION, raw)
    assert image.ledger is None

    results = rescue_image(RegionClients(REGION, ec2=ec2, dynamodb=dynamodb()), ledger_of(ec2), image, NOW)

    # ACCOUNT_A was recorded by the disable stage; ACCOUNT_B only by a forged tag; public needs
    # `shared` (public: true).
    assert [r.status for r in results] == ["ok"]
    assert permissions_of(ec2, image_id) == [{"UserId": ACCOUNT_A}]
    assert "not restored (public: true not set): group:all" in (results[0].detail or "")
    assert (image_or_none(ec2, image_id) or {})["State"] == "available"
    assert items_of(ec2)[image_id].closed == NOW


def test_protected_and_vanished_images_fail_and_the_run_goes_on(ec2: Any) -> None:
    vanished, protected, normal = make_image(ec2, "web-1"), make_image(ec2, "web-2"), make_image(ec2, "web-3")
    ec2.enable_image_deregistration_protection(ImageId=protected)
    inventory = load_inventory(ec2)
    ec2.deregister_image(ImageId=vanished)  # by someone else, after the inventory was read

    result = apply(
        ec2,
        [decision(i, "deregister", ALL_STAGES) for i in (vanished, protected, normal)],
        inventory,
    )

    results = by_key(result)
    assert result.failed == 2
    assert results[(vanished, "deprecate")].status == "failed"
    assert "InvalidAMIID" in (results[(vanished, "deprecate")].error or "")
    assert [results[(vanished, s)].status for s in ("disable", "deregister")] == ["skipped", "skipped"]
    assert results[(protected, "deregister")].status == "failed"
    assert "OperationNotPermitted" in (results[(protected, "deregister")].error or "")
    assert image_or_none(ec2, protected) is not None
    assert results[(normal, "deregister")].status == "ok" and image_or_none(ec2, normal) is None
    assert json.loads(result.model_dump_json())["failed"] == 2
    items = items_of(ec2)
    assert (
        set(items[vanished].stages) == {"deprecate"} and items[vanished].stages["deprecate"].confirmed is None
    )
    # The refused deregistration stays recorded, unconfirmed: its snapshot is left while the AMI is there.
    assert items[protected].deregistered is None and items[normal].deregistered == NOW
    protected_snapshot = snapshot_of(ec2, protected)
    assert [s.snapshot_id for s in items[protected].snapshots] == [protected_snapshot]
    rerun = apply(ec2, [], load_inventory(ec2))
    assert rerun.results == [] and protected_snapshot in snapshot_ids(ec2)


def test_a_deregistration_that_finds_its_ami_gone_is_done_and_handles_its_snapshots(ec2: Any) -> None:
    """Its first answer lost, the SDK retries DeregisterImage and gets InvalidAMIID.Unavailable: the
    AMI is deregistered, and the snapshots the ledger recorded are deleted in the same run."""
    gone, other = make_image(ec2, "web-1"), make_image(ec2, "web-2")
    snapshot = snapshot_of(ec2, gone)
    inventory = load_inventory(ec2)
    ec2.deregister_image(ImageId=gone)  # the first attempt, whose answer never came back

    result = apply(
        ec2, [decision(gone, "deregister", ["deregister"]), decision(other, "deregister")], inventory
    )

    results = by_key(result)
    assert results[(gone, "deregister")].status == "ok", results[(gone, "deregister")]
    assert results[(gone, "deregister")].snapshots_deleted == [snapshot]
    assert snapshot not in snapshot_ids(ec2)
    assert items_of(ec2)[gone].deregistered == NOW
    assert results[(other, "deregister")].status == "ok" and image_or_none(ec2, other) is None


def test_wait_only_starts_the_clock_in_the_ledger_and_keeps_an_existing_one(ec2: Any) -> None:
    fresh, old = make_image(ec2, "web-1"), make_image(ec2, "web-2")
    seed(ledger_of(ec2), old, at=EARLIER)
    # A forged clock tag on the fresh AMI is not believed: its clock starts now.
    ec2.create_tags(Resources=[fresh], Tags=[{"Key": CANDIDATE_TAG, "Value": "2020-01-01T00:00:00Z"}])
    inventory = load_inventory(ec2)
    db = dynamodb()
    log = CallLog(ec2, db)

    result = apply(ec2, [decision(fresh, "wait"), decision(old, "wait")], inventory, db=db)

    assert [(r.image_id, r.action, r.status) for r in result.results] == [(fresh, "mark-candidate", "ok")]
    # The existing clock's mirror tag was never written: it is, from the ledger, before the new clock.
    assert log.changes() == ["CreateTags", "UpdateItem", "CreateTags"]
    assert log.count("UpdateItem", writes(fresh, "SET image_id = :id, first_candidate")) == 1
    assert [params for name, params in log.calls if name == "CreateTags"] == [
        tags_param([old], **{CANDIDATE_TAG: iso(EARLIER) or ""}),
        tags_param([fresh], **{CANDIDATE_TAG: iso(NOW) or ""}),
    ]
    items = items_of(ec2)
    assert items[fresh].first_candidate == NOW and items[old].first_candidate == EARLIER
    assert _tags(image_or_none(ec2, fresh) or {})[CANDIDATE_TAG] == iso(NOW)
    assert _tags(image_or_none(ec2, old) or {})[CANDIDATE_TAG] == iso(EARLIER)


def test_snapshots_the_ledger_recorded_are_deleted_by_the_next_run_and_a_tag_never_deletes(ec2: Any) -> None:
    crashed, forged, user_b, rescued = (make_image(ec2, f"web-{n}") for n in range(1, 5))
    lonely, forged_snapshot, shared = (
        snapshot_of(ec2, crashed),
        snapshot_of(ec2, forged),
        snapshot_of(ec2, user_b),
    )
    rescued_snapshot = snapshot_of(ec2, rescued)
    book = ledger_of(ec2)
    # A run recorded crashed's deregistration (its own snapshot, and one user_b was found to use since),
    # deregistered it and stopped before deleting the snapshots.
    seed(book, crashed, ALL_STAGES, snapshots=[lonely, shared])
    ec2.create_tags(Resources=[lonely, shared], Tags=[{"Key": RETIRED_FROM_TAG, "Value": crashed}])
    ec2.deregister_image(ImageId=crashed)
    # Someone marked a snapshot retired-from an AMI they deregistered: the ledger records nothing of it.
    ec2.create_tags(Resources=[forged_snapshot], Tags=[{"Key": RETIRED_FROM_TAG, "Value": forged}])
    ec2.deregister_image(ImageId=forged)
    # A deregistration the ledger recorded, rescued (closed), then deregistered by hand.
    seed(book, rescued, ALL_STAGES, snapshots=[rescued_snapshot])
    assert book.close(rescued, EARLIER, "deregister") == "recorded"
    ec2.deregister_image(ImageId=rescued)
    emulator.set_image_fields(REGION, user_b, snapshot_id=shared)

    inventory = load_inventory(ec2)
    assert make_plan([], inventory).unfinished_snapshots == [lonely]
    result = apply(ec2, [], inventory)

    assert [(r.image_id, r.action, r.status) for r in result.results] == [
        (crashed, "finish-deregistration", "ok")
    ]
    assert result.snapshots_deleted == [lonely]
    assert lonely not in snapshot_ids(ec2)
    assert {forged_snapshot, shared, rescued_snapshot} <= snapshot_ids(ec2)
    assert items_of(ec2)[crashed].deregistered == NOW
    # Finished: the next run has nothing left to do.
    assert apply(ec2, [], load_inventory(ec2)).results == []
    assert {forged_snapshot, shared, rescued_snapshot} <= snapshot_ids(ec2)


def test_a_throttled_call_fails_one_image_and_the_rerun_does_the_recorded_stage_again(ec2: Any) -> None:
    first, second = make_image(ec2, "web-1"), make_image(ec2, "web-2")

    def throttle_first(params: dict[str, Any], **_: Any) -> None:
        if params.get("ImageId") == first:  # as if every retry was throttled too
            raise ClientError(
                {"Error": {"Code": "RequestLimitExceeded", "Message": "slow down"}}, "DisableImage"
            )

    ec2.meta.events.register("before-parameter-build.ec2.DisableImage", throttle_first)
    result = apply(ec2, [decision(i, "deregister", ALL_STAGES) for i in (first, second)], load_inventory(ec2))
    ec2.meta.events.unregister("before-parameter-build.ec2.DisableImage", throttle_first)

    results = by_key(result)
    assert results[(first, "disable")].status == "failed"
    assert "RequestLimitExceeded" in (results[(first, "disable")].error or "")
    assert results[(first, "deregister")].status == "skipped"
    assert results[(second, "deregister")].status == "ok" and image_or_none(ec2, second) is None
    recorded = items_of(ec2)[first].stages["disable"]
    assert recorded.at == NOW and recorded.confirmed is None
    # The next run picks the image up where it stopped: the recorded disable is done again.
    inventory = load_inventory(ec2)
    rerun_decision = planned(image_in(inventory, first), now=LATER)
    assert rerun_decision.stages == ["disable", "deregister"]
    db = dynamodb()
    log = CallLog(ec2, db)
    rerun = apply(ec2, [rerun_decision], inventory, db=db, now=LATER)
    assert [(r.action, r.status) for r in rerun.results] == [("disable", "ok"), ("deregister", "ok")]
    assert image_or_none(ec2, first) is None
    assert log.count("UpdateItem", stage_write(first, "disable")) == 0
    assert items_of(ec2)[first].stages["disable"] == LedgerStage(at=NOW, confirmed=LATER, redone=LATER)


def test_a_throttled_call_is_retried_by_the_client(ec2: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    class _Body:
        def stream(self, **_: Any) -> Iterator[bytes]:
            yield (
                b"<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>slow down</Message>"
                b"</Error></Errors><RequestID>x</RequestID></Response>"
            )

    image_id = make_image(ec2, "web-1")
    throttled: list[str] = []

    def throttle_once(request: Any, **_: Any) -> AWSResponse | None:
        body = request.body if isinstance(request.body, str) else (request.body or b"").decode()
        if "Action=DisableImage" in body and not throttled:
            throttled.append("DisableImage")
            return AWSResponse(request.url, 503, {}, _Body())
        return None

    # The production client configuration (adaptive retries), with the backoff made instant.
    monkeypatch.setenv("AMI_JANITOR_MAX_ATTEMPTS", "3")
    monkeypatch.setattr("botocore.retries.standard.ExponentialBackoff.delay_amount", lambda self, context: 0)
    client = RegionClients(REGION).ec2
    client.meta.events.register_first("before-send.ec2", throttle_once)

    result = apply(client, [decision(image_id, "disable", ["disable"])], load_inventory(ec2))

    assert throttled == ["DisableImage"]
    assert [(r.action, r.status) for r in result.results] == [("mark-candidate", "ok"), ("disable", "ok")]
    assert (image_or_none(ec2, image_id) or {})["State"] == "disabled"
    assert items_of(ec2)[image_id].stages["disable"].confirmed == NOW


def test_every_call_whose_first_answer_is_lost_is_done_by_the_sdk_retry(
    ec2: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each EC2 and ledger request of all three stages takes effect and its answer is lost; botocore
    sends it again and the retry meets what the first attempt did. Each counts as done: nothing fails,
    no stage is taken for another run's, and the next run has nothing left to do."""
    image_id, other = make_image(ec2, "web-1", share_with=[{"UserId": ACCOUNT_A}]), make_image(ec2, "web-2")
    snapshot = snapshot_of(ec2, image_id)
    monkeypatch.setenv("AMI_JANITOR_MAX_ATTEMPTS", "3")
    monkeypatch.setattr("botocore.retries.standard.ExponentialBackoff.delay_amount", lambda self, context: 0)
    clients = RegionClients(REGION)
    lost = [LoseFirstAnswers(clients.ec2), LoseFirstAnswers(clients.dynamodb, "UpdateItem")]

    result = apply(
        clients.ec2, [decision(image_id, "deregister", ALL_STAGES)], load_inventory(ec2), db=clients.dynamodb
    )

    assert result.failed == 0, result.results
    assert [(r.action, r.status) for r in result.results] == [
        ("mark-candidate", "ok"),
        *[(stage, "ok") for stage in ALL_STAGES],
    ]
    changes = {"CreateTags", "EnableImageDeprecation", "DisableImage", "DeregisterImage", "DeleteSnapshot"}
    assert changes <= set(lost[0].lost) and len(lost[1].lost) == 7, [c.lost for c in lost]
    assert image_or_none(ec2, image_id) is None and snapshot not in snapshot_ids(ec2)
    item = items_of(ec2)[image_id]
    assert set(item.stages) == set(ALL_STAGES) and item.deregistered == NOW
    assert item.stages["disable"].prior_launch_permissions == (f"user:{ACCOUNT_A}",)
    # The next run: nothing of this AMI is left to do.
    again = apply(clients.ec2, [decision(other, "keep")], load_inventory(ec2), db=clients.dynamodb)
    assert again.results == [], again.results


# ---- the ledger decides: stages recorded, raced, adopted ------------------------------------------


def test_a_recorded_stage_ec2_does_not_show_is_done_again_without_a_second_record(ec2: Any) -> None:
    deprecated, disabled = (
        make_image(ec2, "web-1"),
        make_image(ec2, "web-2", share_with=[{"UserId": ACCOUNT_A}]),
    )
    book = ledger_of(ec2)
    # A run recorded these stages, then stopped before EC2 took them. The deprecation `disabled` took
    # is a minute after its record (EC2 refuses a past DeprecateAt, so that run was recent): one more
    # than a day after the record would be taken for an owner's.
    recent = NOW - timedelta(hours=12)
    seed(book, deprecated, ["deprecate"])
    seed(book, disabled, ["deprecate", "disable"], at=recent, permissions=(f"user:{ACCOUNT_A}",))
    book.confirm_stage(disabled, "deprecate", recent)
    ec2.enable_image_deprecation(ImageId=disabled, DeprecateAt=deprecate_at(recent))
    # Since then the AMI was shared with one more account: done again, the stage records it beside the
    # first record's (DisableImage removes it too, so a rescue gives it back).
    ec2.modify_image_attribute(ImageId=disabled, LaunchPermission={"Add": [{"UserId": ACCOUNT_B}]})
    inventory = load_inventory(ec2)
    configured: list[tuple[Stage, int]] = [("deprecate", 0), ("disable", 0)]
    decisions = [planned(image_in(inventory, i), configured) for i in (deprecated, disabled)]
    assert [d.stages for d in decisions] == [["deprecate", "disable"], ["disable"]]
    db = dynamodb()
    log = CallLog(ec2, db)

    result = apply(ec2, decisions, inventory, db=db)

    assert result.failed == 0, result.results
    assert log.count("UpdateItem", stage_write(deprecated, "deprecate")) == 0
    assert log.count("UpdateItem", stage_write(disabled, "disable")) == 0
    assert log.index("EnableImageDeprecation", lambda p: p["ImageId"] == deprecated) < log.index(
        "UpdateItem", stage_confirm(deprecated, "deprecate")
    )
    assert log.index("DisableImage", lambda p: p["ImageId"] == disabled) < log.index(
        "UpdateItem", stage_confirm(disabled, "disable")
    )
    items = items_of(ec2)
    assert items[deprecated].stages["deprecate"] == LedgerStage(at=EARLIER, confirmed=NOW, redone=NOW)
    assert items[deprecated].stages["disable"] == LedgerStage(at=NOW, confirmed=NOW)
    assert items[disabled].stages["disable"] == LedgerStage(
        at=recent,
        prior_launch_permissions=(f"user:{ACCOUNT_A}", f"user:{ACCOUNT_B}"),
        confirmed=NOW,
        redone=NOW,
    )
    assert Image.from_api(REGION, image_or_none(ec2, deprecated) or {}).deprecation_time == deprecate_at(NOW)
    assert (
        _tags(image_or_none(ec2, disabled) or {})[PRIOR_PERMISSIONS_TAG]
        == f"user:{ACCOUNT_A},user:{ACCOUNT_B}"
    )
    assert (image_or_none(ec2, disabled) or {})["State"] == "disabled"


def test_a_recorded_deprecation_hidden_by_a_later_owner_deprecation_is_done_again(ec2: Any) -> None:
    image_id = make_image(ec2, "web-1")
    owner = (NOW + timedelta(days=300)).replace(second=0)
    ec2.enable_image_deprecation(ImageId=image_id, DeprecateAt=owner)
    # A run recorded the deprecate stage (the owner's time as prior), then stopped before EC2 took it.
    seed(ledger_of(ec2), image_id, ["deprecate"], deprecation=owner)
    inventory = load_inventory(ec2)
    configured: list[tuple[Stage, int]] = [("deprecate", 0), ("disable", 30)]

    result = apply(ec2, [planned(image_in(inventory, image_id), configured)], inventory)

    assert result.failed == 0, result.results
    # The janitor's deprecation (a minute after now), not the owner's in 300 days.
    assert Image.from_api(REGION, image_or_none(ec2, image_id) or {}).deprecation_time == deprecate_at(NOW)
    deprecate = items_of(ec2)[image_id].stages["deprecate"]
    assert (deprecate.confirmed, deprecate.prior_deprecation) == (NOW, owner)


def test_a_recorded_deprecation_done_again_days_later_is_done(ec2: Any) -> None:
    image_id = make_image(ec2, "web-1")
    # A run recorded the deprecate stage ten days ago, then stopped before EC2 took it.
    seed(ledger_of(ec2), image_id, ["deprecate"], at=EARLIER)
    configured: list[tuple[Stage, int]] = [("deprecate", 0), ("disable", 30)]
    inventory = load_inventory(ec2)
    first = planned(image_in(inventory, image_id), configured)
    assert first.stages == ["deprecate"]
    assert apply(ec2, [first], inventory).failed == 0
    image = image_in(load_inventory(ec2), image_id)
    assert image.deprecation_time == deprecate_at(NOW)
    assert items_of(ec2)[image_id].stages["deprecate"] == LedgerStage(at=EARLIER, confirmed=NOW, redone=NOW)

    # Done: nothing is due an hour later; the disable stage comes due within its 30 days.
    assert planned(image, configured, LATER).stages == []
    assert planned(image, configured, NOW + timedelta(days=31)).stages == ["disable"]


def test_a_stage_another_run_recorded_is_skipped_and_blocks_the_later_stages(ec2: Any) -> None:
    raced, clocked = make_image(ec2, "web-1"), make_image(ec2, "web-2")
    book = ledger_of(ec2)
    seed(book, raced)
    inventory = load_inventory(ec2)
    # Another run, planned on the same ledger, records first.
    other = LATER - timedelta(minutes=5)
    assert book.record_stage(raced, "deprecate", other, Prior()) == "recorded"
    assert book.record_candidate(clocked, other) == "recorded"
    db = dynamodb()
    log = CallLog(ec2, db)

    result = apply(ec2, [decision(i, "deregister", ALL_STAGES) for i in (raced, clocked)], inventory, db=db)

    assert [(r.image_id, r.action, r.status, r.detail) for r in result.results] == [
        (clocked, "mark-candidate", "skipped", "recorded by another run"),
        (raced, "deprecate", "skipped", "recorded by another run since this plan"),
        (raced, "disable", "skipped", "deprecate not applied"),
        (raced, "deregister", "skipped", "deprecate not applied"),
        (clocked, "deprecate", "skipped", "the ledger could not start its clock"),
        (clocked, "disable", "skipped", "the ledger could not start its clock"),
        (clocked, "deregister", "skipped", "the ledger could not start its clock"),
    ]
    # The mirror tag of the clock the plan saw (never written), then the two refused conditional writes.
    assert log.changes() == ["CreateTags", "UpdateItem", "UpdateItem"]
    assert log.calls[log.index("CreateTags")][1] == tags_param([raced], **{CANDIDATE_TAG: iso(EARLIER) or ""})
    items = items_of(ec2)
    assert items[raced].stages == {"deprecate": LedgerStage(at=other)}
    assert items[clocked].first_candidate == other and items[clocked].stages == {}
    assert all(
        (image_or_none(ec2, i) or {}).get("State") == "available"
        and "DeprecationTime" not in (image_or_none(ec2, i) or {})
        for i in (raced, clocked)
    )


def test_the_adoption_writes_items_marker_and_mirror_once(fake_aws_env: None) -> None:
    emulator.install()
    with mock_aws():
        make_table(adopted=None)
        ec2 = boto3.client("ec2", region_name=REGION, **CREDENTIALS)
        policy = parse_policy(yaml.safe_load(POLICY.format(mode="enforce")))
        project = [{"Key": "Project", "Value": "Web"}]
        deprecated, disabled, waiting, plain = (make_image(ec2, f"web-{n}") for n in range(1, 5))
        ec2.create_tags(Resources=[deprecated, disabled, waiting, plain], Tags=project)
        # An older janitor's tags: a clock, a deprecation it recorded, a disable with the prior
        # permissions (outside share_with: not adopted).
        ec2.enable_image_deprecation(ImageId=deprecated, DeprecateAt=deprecate_at(EARLIER))
        ec2.create_tags(
            Resources=[deprecated],
            Tags=[
                {"Key": CANDIDATE_TAG, "Value": "2020-01-01T00:00:00Z"},
                {"Key": PRIOR_DEPRECATION_TAG, "Value": "none"},
            ],
        )
        ec2.disable_image(ImageId=disabled)
        ec2.create_tags(
            Resources=[disabled],
            Tags=[
                {"Key": CANDIDATE_TAG, "Value": "2020-01-01T00:00:00Z"},
                {"Key": PRIOR_PERMISSIONS_TAG, "Value": f"user:{ACCOUNT_A}"},
            ],
        )
        ec2.create_tags(Resources=[waiting], Tags=[{"Key": CANDIDATE_TAG, "Value": "2020-01-01T00:00:00Z"}])
        inventory = trust.adopted_view(load_inventory(ec2), policy, NOW)
        assert inventory.ledger is not None and sorted(inventory.ledger.adopting) == sorted(
            [deprecated, disabled, waiting]
        )
        decisions = [decision(i, "wait") for i in (deprecated, disabled, waiting, plain)]
        db = dynamodb()
        log = CallLog(ec2, db)

        result = apply(ec2, decisions, inventory, db=db)

        assert result.failed == 0, result.results
        adopted = sorted([deprecated, disabled, waiting])
        assert [(r.image_id, r.action, r.status) for r in result.results] == [
            *[(i, "adopt", "ok") for i in adopted],
            (plain, "mark-candidate", "ok"),
        ]
        for image_id in adopted:
            assert log.count("UpdateItem", lambda p, i=image_id: p["Key"]["pk"]["S"] == f"image#{i}") == 1
        marker = log.index("UpdateItem", lambda p: p["Key"]["pk"]["S"] == "ledger#adoption")
        mirror = log.index("CreateTags", lambda p: p["Resources"] == adopted)
        assert max(log.index("UpdateItem", writes(i, "SET ")) for i in adopted) < marker < mirror
        assert log.calls[mirror][1]["Tags"] == [{"Key": CANDIDATE_TAG, "Value": iso(NOW)}]
        view = ledger_of(ec2).read_all()
        assert view.adopted == NOW
        items = view.items
        assert items[deprecated] == LedgerItem(
            image_id=deprecated,
            first_candidate=NOW,
            stages={"deprecate": LedgerStage(at=NOW, confirmed=NOW, adopted=True)},
            written_last_stage="deprecate",  # the table's, as read
        )
        # No account adopted (outside share_with); recorded as adopted and already disabled: a rescue
        # leaves it disabled.
        assert items[disabled].stages["disable"] == LedgerStage(
            at=NOW, confirmed=NOW, already_disabled=True, adopted=True
        )
        assert items[waiting] == LedgerItem(image_id=waiting, first_candidate=NOW)
        assert items[plain] == LedgerItem(image_id=plain, first_candidate=NOW)
        for image_id in (deprecated, disabled, waiting, plain):
            assert _tags(image_or_none(ec2, image_id) or {})[CANDIDATE_TAG] == iso(NOW)

        # The next run finds the region adopted: nothing is adopted or written again.
        again = trust.adopted_view(load_inventory(ec2), policy, LATER)
        assert again.ledger is not None and again.ledger.adopting == {}
        log.calls.clear()
        rerun = apply(ec2, decisions, again, db=db, now=LATER)
        assert rerun.results == [] and log.changes() == []
        assert ledger_of(ec2).read_all() == view


# ---- crash at any point, rerun from a fresh inventory: the same end state -------------------------

# Role of each AMI: retired by every stage due, kept (shares pair-a's snapshot), a candidate not yet
# due, kept after the janitor deprecated and disabled it (a rescue), retired but protected.
ROLES: dict[str, str] = {
    "solo": "retire",
    "pair-a": "retire",
    "pair-b": "keep",
    "waiting": "wait",
    "rescued": "rescue",
    "protected": "retire",
}
MUTATING_DYNAMODB = ("UpdateItem", "PutItem", "DeleteItem", "BatchWriteItem")


class Crash(Exception):
    """The process dies: not an AWS error, so it goes through apply_plan."""


def build_fleet(ec2: Any) -> tuple[dict[str, str], dict[str, str]]:
    """The fleet of ROLES; returns image label -> id and snapshot id -> label."""
    make_table()
    labels = {label: make_image(ec2, f"web-{label}", share_with=[{"UserId": ACCOUNT_A}]) for label in ROLES}
    snapshots = {snapshot_of(ec2, image_id): label for label, image_id in labels.items()}
    emulator.set_image_fields(REGION, labels["pair-b"], snapshot_id=snapshot_of(ec2, labels["pair-a"]))
    ec2.enable_image_deprecation(
        ImageId=labels["rescued"], DeprecateAt=(NOW + timedelta(days=30)).replace(second=0)
    )
    ec2.enable_image_deregistration_protection(ImageId=labels["protected"])
    retired = apply(
        ec2,
        [decision(labels["rescued"], "disable", ["deprecate", "disable"])],
        load_inventory(ec2),
        now=EARLIER,
    )
    assert retired.failed == 0
    return labels, snapshots


def plan_fleet(ec2: Any, labels: dict[str, str]) -> tuple[list[Decision], RegionInventory]:
    """What the planner decides from a fresh inventory and ledger, for the images still there: due
    stages by the ledger; a rescue only while the ledger has the AMI's clock open."""
    inventory = load_inventory(ec2)
    label_of = {image_id: label for label, image_id in labels.items()}
    decisions = []
    for image in inventory.images:
        role = ROLES[label_of[image.image_id]]
        if role == "retire":
            decisions.append(planned(image))
        elif role == "rescue":
            decisions.append(decision(image.image_id, "rescue" if trust.open_item(image) else "keep"))
        else:
            decisions.append(decision(image.image_id, role))
    return decisions, inventory


def end_state(ec2: Any, labels: dict[str, str], snapshots: dict[str, str]) -> dict[str, Any]:
    """The AMIs (state, deprecation, tags, launch permissions), the snapshots left (their tags) and the
    ledger items (confirmations included), ids named by label."""

    def named(value: str) -> str:
        for label, image_id in labels.items():
            value = value.replace(image_id, label)
        for snapshot_id, label in snapshots.items():
            value = value.replace(snapshot_id, f"snapshot-of-{label}")
        return value

    def mirror(raw: dict[str, Any]) -> dict[str, str]:
        return {k: named(v) for k, v in _tags(raw).items()}

    def recorded(item: LedgerItem) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(named(item.model_dump_json()))
        for stage in data.get("stages", {}).values():
            # When a rerun did a stage the crash interrupted: the rerun's own history, not its state.
            stage.pop("redone", None)
        return data

    label_of = {image_id: label for label, image_id in labels.items()}
    images = {
        label_of[raw["ImageId"]]: (
            raw["State"],
            raw.get("DeprecationTime"),
            mirror(raw),
            permissions_of(ec2, raw["ImageId"]),
        )
        for raw in ec2.describe_images(Owners=["self"], IncludeDeprecated=True, IncludeDisabled=True)[
            "Images"
        ]
    }
    kept_snapshots = {
        snapshots[raw["SnapshotId"]]: mirror(raw)
        for raw in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]
    }
    items = {label_of[i]: recorded(item) for i, item in ledger_of(ec2).read_all().items.items()}
    return {"images": images, "snapshots": kept_snapshots, "ledger": items}


def crash_after(clients: Sequence[Any], budget: int) -> Callable[[], list[str]]:
    """Let `budget` mutating calls (EC2 or the ledger's) through, then crash; returns the calls let
    through."""
    passed: list[str] = []

    def hook(model: Any, **_: Any) -> None:
        if model.name.startswith(READS):
            return
        if len(passed) >= budget:
            raise Crash(model.name)
        passed.append(model.name)

    for client in clients:
        client.meta.events.register(
            f"before-call.{client.meta.service_model.service_name}", hook, unique_id="crash-after"
        )
    return lambda: list(passed)


def run_case(ec2: Any, budget: int | None) -> tuple[dict[str, Any], list[str]]:
    db = dynamodb()
    with mock_aws():
        labels, snapshots = build_fleet(ec2)
        calls = crash_after([ec2, db], budget if budget is not None else 10**6)
        try:
            decisions, inventory = plan_fleet(ec2, labels)
            apply(ec2, decisions, inventory, db=db)
        except Crash:
            pass
        finally:
            for client in (ec2, db):
                service = client.meta.service_model.service_name
                client.meta.events.unregister(f"before-call.{service}", unique_id="crash-after")
        let_through = calls()
        decisions, inventory = plan_fleet(ec2, labels)
        apply(ec2, decisions, inventory, db=db)  # the rerun (a no-op after a clean run)
        return end_state(ec2, labels, snapshots), let_through


CRASH_SHARDS = 4


@pytest.mark.parametrize("shard", range(CRASH_SHARDS))
def test_a_rerun_after_a_crash_at_any_point_converges(fake_aws_env: None, shard: int) -> None:
    """A crash between any two calls, the ledger's included (between its record and the EC2 change,
    between the change and its confirmation): the rerun reaches the same AMIs, snapshots and ledger.
    The snapshots of a deregistration the crash interrupted are deleted by the rerun: the ledger
    recorded them. The crash points are dealt over CRASH_SHARDS cases so that they run side by side."""
    emulator.install()
    ec2 = boto3.client("ec2", region_name=REGION, **CREDENTIALS)
    expected, calls = run_case(ec2, None)
    assert set(expected["images"]) == {"pair-b", "waiting", "rescued", "protected"}
    assert set(expected["snapshots"]) == {"pair-a", "pair-b", "waiting", "rescued", "protected"}
    assert set(expected["ledger"]) == {"solo", "pair-a", "waiting", "rescued", "protected"}
    assert expected["ledger"]["rescued"]["closed"] is not None
    assert [s["snapshot_id"] for s in expected["ledger"]["solo"]["snapshots"]] == ["snapshot-of-solo"]
    assert expected["images"]["protected"][:2] == ("disabled", expected["images"]["protected"][1])
    total = len(calls)
    assert total > 35 and {"UpdateItem", "DeregisterImage", "DeleteSnapshot", "EnableImage"} <= set(calls)
    diverged = []
    for budget in range(shard, total, CRASH_SHARDS):
        state, _ = run_case(ec2, budget)
        if state != expected:
            diverged.append(f"crash after {budget} mutating calls, before {calls[budget]}")
    assert diverged == []


def crash_before(
    client: Any, operation: str, predicate: Callable[[dict[str, Any]], bool]
) -> Callable[[], None]:
    """Crash the run at the first `operation` call of `client` that matches; returns the undo."""
    event = f"before-parameter-build.{client.meta.service_model.service_name}.{operation}"

    def hook(params: dict[str, Any], **_: Any) -> None:
        if predicate(params):
            raise Crash(operation)

    client.meta.events.register(event, hook, unique_id="crash-before")
    return lambda: client.meta.events.unregister(event, unique_id="crash-before")


def crashed_then_rerun(
    ec2: Any,
    db: Any,
    operation: str,
    predicate: Callable[[dict[str, Any]], bool],
    decide: Callable[[RegionInventory], list[Decision]],
) -> None:
    """Apply the decisions of a fresh inventory, crash before the matching call, rerun from a fresh
    inventory and ledger."""
    client = db if operation in MUTATING_DYNAMODB else ec2
    undo = crash_before(client, operation, predicate)
    try:
        inventory = load_inventory(ec2)
        with pytest.raises(Crash):
            apply(ec2, decide(inventory), inventory, db=db)
    finally:
        undo()
    inventory = load_inventory(ec2)
    assert apply(ec2, decide(inventory), inventory, db=db).failed == 0


def test_a_crash_between_the_clock_and_its_mirror_tag_leaves_no_tag_unwritten(ec2: Any) -> None:
    image_id = make_image(ec2, "web-1")
    crashed_then_rerun(
        ec2,
        dynamodb(),
        "CreateTags",
        lambda p: p["Resources"] == [image_id],
        lambda _: [decision(image_id, "wait")],
    )
    assert items_of(ec2)[image_id].first_candidate == NOW
    assert _tags(image_or_none(ec2, image_id) or {}).get(CANDIDATE_TAG) == iso(NOW)


@pytest.mark.parametrize(
    ("stage", "key"), [("deprecate", PRIOR_DEPRECATION_TAG), ("disable", PRIOR_PERMISSIONS_TAG)]
)
def test_a_crash_between_a_stage_and_its_mirror_tag_leaves_no_tag_unwritten(
    ec2: Any, stage: Stage, key: str
) -> None:
    """The ledger recorded the stage, the run stopped before its mirror tag: the rerun leaves the tag
    written from the ledger's record."""
    image_id = make_image(ec2, "web-1")
    configured: list[tuple[Stage, int]] = [("deprecate", 0), ("disable", 0), ("deregister", 30)]
    crashed_then_rerun(
        ec2,
        dynamodb(),
        "CreateTags",
        lambda p: p["Resources"] == [image_id] and any(t["Key"] == key for t in p["Tags"]),
        lambda inventory: [planned(image_in(inventory, image_id), configured)],
    )
    tags = _tags(image_or_none(ec2, image_id) or {})
    assert key in tags, tags
    assert tags.get(PRIOR_DEPRECATION_TAG) == "none"


def test_a_crash_between_a_change_and_its_confirmation_is_confirmed_by_the_rerun(ec2: Any) -> None:
    image_id = make_image(ec2, "web-1")
    configured: list[tuple[Stage, int]] = [("deprecate", 0), ("disable", 30)]
    crashed_then_rerun(
        ec2,
        dynamodb(),
        "UpdateItem",
        stage_confirm(image_id, "deprecate"),
        lambda inventory: [planned(image_in(inventory, image_id), configured)],
    )
    assert Image.from_api(REGION, image_or_none(ec2, image_id) or {}).deprecation_time == deprecate_at(NOW)
    assert items_of(ec2)[image_id].stages["deprecate"].confirmed == NOW


def test_a_crash_before_a_deregistration_is_confirmed_is_confirmed_by_the_rerun(ec2: Any) -> None:
    pair_a, pair_b = make_image(ec2, "web-1"), make_image(ec2, "web-2")
    emulator.set_image_fields(REGION, pair_b, snapshot_id=snapshot_of(ec2, pair_a))  # no snapshot of its own
    crashed_then_rerun(
        ec2,
        dynamodb(),
        "UpdateItem",
        writes(pair_a, "SET deregistered"),
        lambda inventory: [planned(i) for i in inventory.images if i.image_id == pair_a],
    )
    assert image_or_none(ec2, pair_a) is None
    assert items_of(ec2)[pair_a].deregistered == NOW


def test_a_crash_in_a_rescue_before_its_clock_is_closed_is_finished_by_the_rerun(ec2: Any) -> None:
    image_id = make_image(ec2, "web-1", share_with=[{"UserId": ACCOUNT_A}])
    snapshot = snapshot_of(ec2, image_id)
    ec2.enable_image_deregistration_protection(ImageId=image_id)
    assert apply(ec2, [decision(image_id, "deregister", ALL_STAGES)], load_inventory(ec2)).failed == 1

    def rescue_while_open(inventory: RegionInventory) -> list[Decision]:
        open_clock = trust.open_item(image_in(inventory, image_id)) is not None
        return [decision(image_id, "rescue" if open_clock else "keep")]

    crashed_then_rerun(ec2, dynamodb(), "DeleteTags", lambda _: True, rescue_while_open)
    assert items_of(ec2)[image_id].closed == NOW
    assert (image_or_none(ec2, image_id) or {})["State"] == "available"
    assert _tags(ec2.describe_snapshots(SnapshotIds=[snapshot])["Snapshots"][0]) == {}
    assert _tags(image_or_none(ec2, image_id) or {}) == {}


def test_a_rescue_writes_no_clock_tag_back_onto_the_ami_it_rescued(ec2: Any) -> None:
    image_id = make_image(ec2, "web-1", share_with=[{"UserId": ACCOUNT_A}])
    assert apply(ec2, [decision(image_id, "disable", ["disable"])], load_inventory(ec2)).failed == 0
    # The clock's mirror tag is gone (removed by hand, or by a rescue that stopped before the close).
    ec2.delete_tags(Resources=[image_id], Tags=[{"Key": CANDIDATE_TAG}])

    result = apply(ec2, [decision(image_id, "rescue")], load_inventory(ec2), now=LATER)

    assert [(r.action, r.status) for r in result.results] == [("rescue", "ok")]
    assert items_of(ec2)[image_id].closed == LATER
    assert (image_or_none(ec2, image_id) or {})["State"] == "available"
    assert _tags(image_or_none(ec2, image_id) or {}) == {}
    assert trust.tampered(load_inventory(ec2)) == []


# ---- exact requests (botocore Stubber) for what moto lacks or gets wrong ---------------------------

CLOCK_START = FIXED_NOW - timedelta(days=30)


@pytest.fixture
def stubbed(fake_aws_env: None) -> Iterator[tuple[Any, Stubber]]:
    """A stubbed EC2 client; the ledger on moto (a test about the ledger's requests stubs it too)."""
    with mock_aws():
        make_table(adopted=FIXED_NOW - timedelta(days=100))
        client = boto3.client("ec2", region_name=REGION, **CREDENTIALS)
        with Stubber(client) as stubber:
            yield client, stubber
            stubber.assert_no_pending_responses()


def stub_image(**fields: Any) -> Image:
    values: dict[str, Any] = {
        "image_id": "ami-0aaaaaaaaaaaaaaa1",
        "region": REGION,
        "name": "web-1",
        "architecture": "x86_64",
        "state": "available",
        "created": FIXED_NOW - timedelta(days=100),
        "snapshot_ids": ("snap-0000000000000001", "snap-0000000000000002"),
    }
    return Image(**{**values, **fields})


def clocked(
    image_id: str,
    confirmed: Sequence[Stage] = (),
    *,
    stages: Mapping[Stage, LedgerStage] | None = None,
    **fields: Any,
) -> LedgerItem:
    """A ledger item with its clock running, `confirmed` stages applied and confirmed, and `stages` as
    given."""
    done = {stage: LedgerStage(at=CLOCK_START, confirmed=CLOCK_START) for stage in confirmed}
    return LedgerItem(
        image_id=image_id, first_candidate=CLOCK_START, stages={**done, **(stages or {})}, **fields
    )


def tags_param(resources: list[str], **tags: str) -> dict[str, Any]:
    return {"Resources": resources, "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}


def stub_ledger(client: Any, *items: LedgerItem) -> Ledger:
    """The moto ledger of a stubbed test, holding `items` (written as an earlier run left them)."""
    book = Ledger(RegionClients(REGION, ec2=client, dynamodb=dynamodb()), TABLE)
    for item in items:
        assert book.adopt(item) == "recorded"
    return book


def apply_stubbed(
    client: Any, decisions: list[Decision], images: Sequence[Image], book: Ledger | None = None
) -> ApplyResult:
    book = book if book is not None else stub_ledger(client)
    inventory = with_ledger(RegionInventory(region=REGION, images=tuple(images), ledger=book.read_all()))
    return apply_plan(
        make_plan(decisions, inventory),
        {REGION: inventory},
        clients_for(client),
        FIXED_NOW,
        ledger_for=lambda _: book,
    )


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC), datetime(2030, 1, 2, 3, 6, tzinfo=UTC)),
        (datetime(2030, 1, 2, 3, 4, 0, tzinfo=UTC), datetime(2030, 1, 2, 3, 5, tzinfo=UTC)),
        (datetime(2030, 1, 2, 3, 59, 0, 1, tzinfo=UTC), datetime(2030, 1, 2, 4, 1, tzinfo=UTC)),
    ],
)
def test_deprecate_at_is_a_minute_ahead_rounded_up(now: datetime, expected: datetime) -> None:
    assert deprecate_at(now) == expected


def test_deprecate_at_is_never_in_the_past() -> None:
    assert deprecate_at(datetime(2020, 1, 1, tzinfo=UTC)) >= datetime.now(UTC) + timedelta(minutes=1)


def _key(image_id: str) -> dict[str, Any]:
    return {"pk": {"S": f"image#{image_id}"}, "sk": {"S": "item"}}


def _record_stage(
    image_id: str, stage: Stage, previous: Stage | None, entry: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """The exact UpdateItem of Ledger.record_stage at FIXED_NOW."""
    condition = "attribute_exists(first_candidate) AND attribute_not_exists(closed)"
    values: dict[str, Any] = {":stage": {"S": stage}, ":entry": {"M": entry}}
    if previous is None:
        condition += " AND attribute_not_exists(last_stage)"
    else:
        condition += " AND last_stage = :previous"
        values[":previous"] = {"S": previous}
    request: dict[str, Any] = {
        "TableName": TABLE,
        "Key": _key(image_id),
        "UpdateExpression": "SET stages.#stage = :entry, last_stage = :stage",
        "ConditionExpression": condition,
        "ExpressionAttributeNames": {"#stage": stage},
        "ExpressionAttributeValues": values,
    }
    if extra:
        request["UpdateExpression"] += ", snapshots = :snapshots"
        values.update(extra)
    return request


def _confirm_stage(image_id: str, stage: Stage) -> dict[str, Any]:
    return {
        "TableName": TABLE,
        "Key": _key(image_id),
        "UpdateExpression": "SET stages.#stage.confirmed = :at",
        "ConditionExpression": "attribute_exists(stages.#stage) AND attribute_not_exists(closed)",
        "ExpressionAttributeNames": {"#stage": stage},
        "ExpressionAttributeValues": {":at": {"S": "2030-01-02T03:04:05Z"}},
    }


def test_exact_requests_of_all_three_stages(stubbed: tuple[Any, Stubber]) -> None:
    client, stub = stubbed
    db = dynamodb()
    image = stub_image()  # launch permissions not loaded: the disable stage asks for them
    ami, (snap1, snap2) = image.image_id, image.snapshot_ids
    at = {"S": "2030-01-02T03:04:05Z"}
    ledger_requests = [
        {
            "TableName": TABLE,
            "Key": _key(ami),
            "UpdateExpression": "SET image_id = :id, first_candidate = :at, stages = :none "
            "REMOVE closed, last_stage, snapshots, deregistered, #ttl",
            "ConditionExpression": "attribute_not_exists(first_candidate) OR attribute_exists(closed)",
            "ExpressionAttributeNames": {"#ttl": "ttl"},
            "ExpressionAttributeValues": {":id": {"S": ami}, ":at": at, ":none": {"M": {}}},
        },
        # A stage entry leaves out what is at its default (no prior deprecation or permissions).
        _record_stage(ami, "deprecate", None, {"at": at}),
        _confirm_stage(ami, "deprecate"),
        _record_stage(
            ami,
            "disable",
            "deprecate",
            {"at": at, "prior_launch_permissions": {"L": [{"S": "group:all"}, {"S": f"user:{ACCOUNT_A}"}]}},
        ),
        _confirm_stage(ami, "disable"),
        # Both snapshots are the AMI's own (no other AMI of the region uses them).
        _record_stage(
            ami,
            "deregister",
            "disable",
            {"at": at},
            **{
                ":snapshots": {
                    "L": [{"M": {"snapshot_id": {"S": s}, "image_id": {"S": ami}}} for s in (snap1, snap2)]
                },
            },
        ),
        # Confirmed: nothing left to finish, the item expires retention_days (90) later.
        {
            "TableName": TABLE,
            "Key": _key(ami),
            "UpdateExpression": "SET deregistered = :at, #ttl = :ttl",
            "ConditionExpression": "attribute_exists(stages.deregister) AND attribute_not_exists(deregistered)",
            "ExpressionAttributeNames": {"#ttl": "ttl"},
            "ExpressionAttributeValues": {
                ":at": at,
                ":ttl": {"N": str(int((FIXED_NOW + timedelta(days=90)).timestamp()))},
            },
        },
    ]
    stub.add_response("create_tags", {}, tags_param([ami], **{CANDIDATE_TAG: "2030-01-02T03:04:05Z"}))
    # No prior-deprecation or prior-permissions mirror tag: the AMI is deregistered in this run.
    stub.add_response(
        "enable_image_deprecation",
        {"Return": True},
        {"ImageId": ami, "DeprecateAt": datetime(2030, 1, 2, 3, 6, tzinfo=UTC)},
    )
    stub.add_response(
        "describe_image_attribute",
        {"ImageId": ami, "LaunchPermissions": [{"UserId": ACCOUNT_A}, {"Group": "all"}]},
        {"ImageId": ami, "Attribute": "launchPermission"},
    )
    stub.add_response("disable_image", {"Return": True}, {"ImageId": ami})
    stub.add_response("create_tags", {}, tags_param([snap1, snap2], **{RETIRED_FROM_TAG: ami}))
    stub.add_response(
        "deregister_image",
        {
            "Return": True,
            "DeleteSnapshotResults": [
                {"SnapshotId": snap1, "ReturnCode": "success"},
                {"SnapshotId": snap2, "ReturnCode": "skipped"},
            ],
        },
        {"ImageId": ami, "DeleteAssociatedSnapshots": True},
    )
    # No DeleteSnapshot is stubbed: a fallback call would fail the stage.
    log = CallLog(client, db)
    book = Ledger(RegionClients(REGION, ec2=client, dynamodb=db), TABLE)
    inventory = RegionInventory(
        region=REGION,
        images=(image,),
        ledger=LedgerView(table=TABLE, adopted=FIXED_NOW - timedelta(days=100)),
    )

    with Stubber(db) as ledger_stub:
        for request in ledger_requests:
            ledger_stub.add_response("update_item", {}, ledger_write(request))
        result = apply_plan(
            make_plan([decision(ami, "deregister", ALL_STAGES)]),
            {REGION: inventory},
            clients_for(client, db),
            FIXED_NOW,
            ledger_for=lambda _: book,
        )
        ledger_stub.assert_no_pending_responses()

    assert [(r.action, r.status) for r in result.results] == [
        ("mark-candidate", "ok"),
        ("deprecate", "ok"),
        ("disable", "ok"),
        ("deregister", "ok"),
    ]
    assert result.snapshots_deleted == [snap1]
    assert f"{snap2} kept" in (result.results[-1].detail or "")
    # The ledger first, the change, then its confirmation.
    assert [name for name, _ in log.calls] == [
        "UpdateItem",
        "CreateTags",
        "UpdateItem",
        "EnableImageDeprecation",
        "UpdateItem",
        "DescribeImageAttribute",
        "UpdateItem",
        "DisableImage",
        "UpdateItem",
        "UpdateItem",
        "CreateTags",
        "DeregisterImage",
        "UpdateItem",
    ]


def test_exact_requests_when_delete_snapshot_results_are_absent(stubbed: tuple[Any, Stubber]) -> None:
    client, stub = stubbed
    image = stub_image(state="disabled")
    other = stub_image(image_id="ami-0aaaaaaaaaaaaaaa2", snapshot_ids=("snap-0000000000000002",))
    snap1, snap2 = image.snapshot_ids
    book = stub_ledger(client, clocked(image.image_id, ["deprecate", "disable"]))
    # snap2 is the other image's too: not recorded, not marked, not deleted.
    stub.add_response("create_tags", {}, tags_param([snap1], **{RETIRED_FROM_TAG: image.image_id}))
    stub.add_response(
        "deregister_image", {"Return": True}, {"ImageId": image.image_id, "DeleteAssociatedSnapshots": True}
    )
    stub.add_client_error(
        "delete_snapshot", "InvalidSnapshot.NotFound", "gone", expected_params={"SnapshotId": snap1}
    )

    result = apply_stubbed(
        client, [decision(image.image_id, "deregister", ["deregister"])], [image, other], book
    )

    (only,) = result.results
    assert (only.action, only.status, only.snapshots_deleted) == ("deregister", "ok", [])
    assert f"{snap1} already deleted" in (only.detail or "") and f"{snap2} kept" in (only.detail or "")
    item = book.read_all().items[image.image_id]
    assert item.snapshots == (LedgerSnapshot(snapshot_id=snap1, image_id=image.image_id),)
    assert item.deregistered == FIXED_NOW


def test_a_snapshot_the_sdks_retry_finds_gone_counts_as_deleted(stubbed: tuple[Any, Stubber]) -> None:
    """The first DeleteSnapshot took effect and its answer was lost; botocore's retry met NotFound and
    says so (RetryAttempts): the run deleted it, and counts it (the GiB freed are an upper bound)."""
    client, stub = stubbed
    image = stub_image(state="disabled")
    other = stub_image(image_id="ami-0aaaaaaaaaaaaaaa2", snapshot_ids=("snap-0000000000000002",))
    snap1, _snap2 = image.snapshot_ids
    book = stub_ledger(client, clocked(image.image_id, ["deprecate", "disable"]))
    stub.add_response("create_tags", {}, tags_param([snap1], **{RETIRED_FROM_TAG: image.image_id}))
    stub.add_response(
        "deregister_image", {"Return": True}, {"ImageId": image.image_id, "DeleteAssociatedSnapshots": True}
    )
    stub.add_client_error(
        "delete_snapshot",
        "InvalidSnapshot.NotFound",
        "gone",
        expected_params={"SnapshotId": snap1},
        response_meta={"RetryAttempts": 1},
    )

    result = apply_stubbed(
        client, [decision(image.image_id, "deregister", ["deregister"])], [image, other], book
    )

    (only,) = result.results
    assert (only.action, only.status, only.snapshots_deleted) == ("deregister", "ok", [snap1])
    assert f"{snap1} deleted (the SDK's retry found it gone" in (only.detail or "")


def test_a_partition_without_delete_associated_snapshots_deregisters_without_it(
    stubbed: tuple[Any, Stubber],
) -> None:
    """EC2 refuses a parameter it does not know: the AMI is deregistered without it, and its own
    snapshot deleted one by one, as where no DeleteSnapshotResults come back."""
    client, stub = stubbed
    image = stub_image(state="disabled", snapshot_ids=("snap-0000000000000001",))
    (snap,) = image.snapshot_ids
    book = stub_ledger(client, clocked(image.image_id, ["deprecate", "disable"]))
    stub.add_response("create_tags", {}, tags_param([snap], **{RETIRED_FROM_TAG: image.image_id}))
    stub.add_client_error(
        "deregister_image",
        "UnknownParameter",
        "The parameter DeleteAssociatedSnapshots is not recognized",
        expected_params={"ImageId": image.image_id, "DeleteAssociatedSnapshots": True},
    )
    stub.add_response("deregister_image", {"Return": True}, {"ImageId": image.image_id})
    stub.add_response("delete_snapshot", {}, {"SnapshotId": snap})

    result = apply_stubbed(client, [decision(image.image_id, "deregister", ["deregister"])], [image], book)

    (only,) = result.results
    assert (only.action, only.status, only.snapshots_deleted) == ("deregister", "ok", [snap])
    assert book.read_all().items[image.image_id].deregistered == FIXED_NOW


def test_a_failing_delete_snapshot_code_fails_the_stage_and_leaves_it_unfinished(
    stubbed: tuple[Any, Stubber],
) -> None:
    client, stub = stubbed
    image = stub_image(state="disabled", snapshot_ids=("snap-0000000000000001",))
    book = stub_ledger(client, clocked(image.image_id, ["deprecate", "disable"]))
    stub.add_response(
        "create_tags", {}, tags_param(["snap-0000000000000001"], **{RETIRED_FROM_TAG: image.image_id})
    )
    stub.add_response(
        "deregister_image",
        {
            "Return": True,
            "DeleteSnapshotResults": [
                {"SnapshotId": "snap-0000000000000001", "ReturnCode": "missing-permissions"}
            ],
        },
        {"ImageId": image.image_id, "DeleteAssociatedSnapshots": True},
    )
    result = apply_stubbed(client, [decision(image.image_id, "deregister", ["deregister"])], [image], book)
    assert result.failed == 1 and "missing-permissions" in (result.results[0].error or "")
    # Not confirmed: the next run (the AMI gone) deletes the snapshot the ledger recorded.
    view = book.read_all()
    assert view.items[image.image_id].deregistered is None
    gone = RegionInventory(region=REGION, ledger=view)
    assert [s.snapshot_id for s in trust.unfinished_snapshots(gone)] == ["snap-0000000000000001"]
    stub.add_response("delete_snapshot", {}, {"SnapshotId": "snap-0000000000000001"})
    rerun = apply_plan(
        make_plan([], gone), {REGION: gone}, clients_for(client), FIXED_NOW, ledger_for=lambda _: book
    )
    assert [(r.action, r.status, r.snapshots_deleted) for r in rerun.results] == [
        ("finish-deregistration", "ok", ["snap-0000000000000001"])
    ]
    assert book.read_all().items[image.image_id].deregistered == FIXED_NOW


def test_instance_store_image_leaves_its_bundle(stubbed: tuple[Any, Stubber]) -> None:
    client, stub = stubbed
    image = stub_image(state="disabled", snapshot_ids=(), root_device_type="instance-store")
    book = stub_ledger(client, clocked(image.image_id, ["deprecate", "disable"]))
    stub.add_response(
        "deregister_image", {"Return": True}, {"ImageId": image.image_id, "DeleteAssociatedSnapshots": True}
    )
    result = apply_stubbed(client, [decision(image.image_id, "deregister", ["deregister"])], [image], book)
    assert result.results[0].status == "ok" and "S3 bundle" in (result.results[0].detail or "")
    assert book.read_all().items[image.image_id].deregistered == FIXED_NOW


def test_exact_requests_of_a_rescue(stubbed: tuple[Any, Stubber]) -> None:
    client, stub = stubbed
    db = dynamodb()
    ami = "ami-0aaaaaaaaaaaaaaa1"
    # Deprecated, disabled, then a deregistration EC2 refused (its snapshot recorded and marked).
    item = clocked(
        ami,
        stages={
            "deprecate": LedgerStage(at=CLOCK_START, prior_deprecation=datetime(2030, 6, 1, tzinfo=UTC)),
            "disable": LedgerStage(
                at=CLOCK_START, prior_launch_permissions=("group:all", f"org:{ORG}", f"user:{ACCOUNT_A}")
            ),
            "deregister": LedgerStage(at=CLOCK_START),
        },
        snapshots=(LedgerSnapshot(snapshot_id="snap-0000000000000002", image_id=ami),),
    )
    image = stub_image(
        state="disabled",
        deprecation_time=datetime(2030, 1, 2, 3, 6, tzinfo=UTC),
        launch_permissions=(),
        ledger=item,
        tags={
            "Project": "PetTracker",
            CANDIDATE_TAG: "2029-12-01T00:00:00Z",
            PRIOR_DEPRECATION_TAG: "2030-06-01T00:00:00Z",
            # Forged: the ledger never recorded ACCOUNT_B.
            PRIOR_PERMISSIONS_TAG: f"org:{ORG},user:{ACCOUNT_A},user:{ACCOUNT_B}",
        },
    )
    stub.add_response("enable_image", {"Return": True}, {"ImageId": ami})
    stub.add_response(
        "enable_image_deprecation",
        {"Return": True},
        {"ImageId": ami, "DeprecateAt": datetime(2030, 6, 1, tzinfo=UTC)},
    )
    stub.add_response(
        "modify_image_attribute",
        {},
        # What the ledger recorded; the public group only where the family shares it.
        {"ImageId": ami, "LaunchPermission": {"Add": [{"OrganizationArn": ORG}, {"UserId": ACCOUNT_A}]}},
    )
    # EC2 is back, the snapshots unmarked and the mirror gone before the ledger closes the clock: a
    # crash before the close leaves it open for a rerun to finish.
    stub.add_response(
        "delete_tags", {}, {"Resources": ["snap-0000000000000002"], "Tags": [{"Key": RETIRED_FROM_TAG}]}
    )
    stub.add_response(
        "delete_tags",
        {},
        {
            "Resources": [ami],
            "Tags": [
                {"Key": k} for k in sorted([CANDIDATE_TAG, PRIOR_DEPRECATION_TAG, PRIOR_PERMISSIONS_TAG])
            ],
        },
    )
    log = CallLog(client, db)

    with Stubber(db) as ledger_stub:
        ledger_stub.add_response(
            "update_item",
            {},
            ledger_write(
                {
                    "TableName": TABLE,
                    "Key": _key(ami),
                    "UpdateExpression": "SET closed = :at",
                    # No stage recorded since the rescue read the item: its last is the one undone last.
                    "ConditionExpression": "attribute_exists(first_candidate) AND attribute_not_exists(closed)"
                    " AND last_stage = :seen"
                    # ... nor done again since (a redo leaves last_stage as it is).
                    " AND attribute_not_exists(stages.#s0.redone)"
                    " AND attribute_not_exists(stages.#s1.redone)"
                    " AND attribute_not_exists(stages.#s2.redone)",
                    "ExpressionAttributeNames": {"#s0": "deprecate", "#s1": "deregister", "#s2": "disable"},
                    "ExpressionAttributeValues": {
                        ":at": {"S": "2030-01-02T03:04:05Z"},
                        ":seen": {"S": "deregister"},
                    },
                }
            ),
        )
        book = Ledger(RegionClients(REGION, ec2=client, dynamodb=db), TABLE)
        results = rescue_image(RegionClients(REGION, ec2=client, dynamodb=db), book, image, FIXED_NOW)
        ledger_stub.assert_no_pending_responses()

    assert [(r.action, r.status) for r in results] == [("rescue", "ok")]
    assert "not restored (public: true not set): group:all" in (results[0].detail or "")
    assert [name for name, _ in log.calls] == [
        "EnableImage",
        "EnableImageDeprecation",
        "ModifyImageAttribute",
        "DeleteTags",
        "DeleteTags",
        "UpdateItem",
    ]


def test_rescue_cancels_a_janitor_deprecation_and_leaves_a_past_owner_one(
    stubbed: tuple[Any, Stubber],
) -> None:
    client, stub = stubbed
    cancelled = stub_image(
        deprecation_time=datetime(2030, 1, 2, 3, 6, tzinfo=UTC),
        tags={CANDIDATE_TAG: "2029-12-01T00:00:00Z", PRIOR_DEPRECATION_TAG: "none"},
    )
    # The mirror tag of `past` was removed by someone: the ledger's prior deprecation is what counts.
    past = stub_image(
        image_id="ami-0aaaaaaaaaaaaaaa2", deprecation_time=datetime(2030, 1, 2, 3, 6, tzinfo=UTC)
    )
    book = stub_ledger(
        client,
        clocked(cancelled.image_id, ["deprecate"]),
        clocked(
            past.image_id,
            stages={
                "deprecate": LedgerStage(
                    at=CLOCK_START, prior_deprecation=datetime(2029, 6, 1, tzinfo=UTC), confirmed=CLOCK_START
                )
            },
        ),
    )
    stub.add_response("disable_image_deprecation", {"Return": True}, {"ImageId": cancelled.image_id})
    stub.add_response(
        "delete_tags",
        {},
        {"Resources": [cancelled.image_id], "Tags": [{"Key": CANDIDATE_TAG}, {"Key": PRIOR_DEPRECATION_TAG}]},
    )

    result = apply_stubbed(
        client, [decision(i.image_id, "rescue") for i in (cancelled, past)], [cancelled, past], book
    )

    assert [r.status for r in result.results] == ["ok", "ok"]
    assert "left deprecated" in (result.results[1].detail or "")
    assert all(item.closed == FIXED_NOW for item in book.read_all().items.values())


def test_a_failed_ledger_clock_write_blocks_the_stages(stubbed: tuple[Any, Stubber]) -> None:
    client, _ = stubbed  # no EC2 call is stubbed: none may be made
    db = dynamodb()
    image = stub_image()
    book = Ledger(RegionClients(REGION, ec2=client, dynamodb=db), TABLE)
    inventory = RegionInventory(
        region=REGION, images=(image,), ledger=LedgerView(table=TABLE, adopted=FIXED_NOW)
    )
    with Stubber(db) as ledger_stub:
        ledger_stub.add_client_error("update_item", "ProvisionedThroughputExceededException", "slow down")
        result = apply_plan(
            make_plan([decision(image.image_id, "deregister", ALL_STAGES)]),
            {REGION: inventory},
            clients_for(client, db),
            FIXED_NOW,
            ledger_for=lambda _: book,
        )
    assert [(r.action, r.status) for r in result.results] == [
        ("mark-candidate", "failed"),
        ("deprecate", "skipped"),
        ("disable", "skipped"),
        ("deregister", "skipped"),
    ]
    assert "ProvisionedThroughputExceeded" in (result.results[0].error or "")


def test_a_failed_mirror_tag_does_not_stop_the_clock(stubbed: tuple[Any, Stubber]) -> None:
    client, stub = stubbed
    image = stub_image()
    stub.add_client_error("create_tags", "RequestLimitExceeded", "slow down")
    book = stub_ledger(client)
    result = apply_stubbed(client, [decision(image.image_id, "wait")], [image], book)
    (only,) = result.results
    assert (only.action, only.status) == ("mark-candidate", "ok")
    assert "mirror tag not written" in (only.detail or "")
    assert book.read_all().items[image.image_id].first_candidate == FIXED_NOW


def test_the_clock_is_batched_by_create_tags_limit(stubbed: tuple[Any, Stubber]) -> None:
    client, stub = stubbed
    images = [stub_image(image_id=f"ami-{n:017x}") for n in range(1, 1002)]
    ids = [i.image_id for i in images]
    stub.add_response("create_tags", {}, tags_param(ids[:1000], **{CANDIDATE_TAG: "2030-01-02T03:04:05Z"}))
    stub.add_response("create_tags", {}, tags_param(ids[1000:], **{CANDIDATE_TAG: "2030-01-02T03:04:05Z"}))
    # The ledger on the fake's DynamoDB (checked against DynamoDB by test_fake_ledger_matches): a
    # thousand clocks on moto's take seconds, and the ledger's writes are not what this test is about.
    from fake_ec2 import FakeEC2

    book = Ledger(RegionClients(REGION, ec2=client, dynamodb=FakeEC2(REGION).dynamodb), TABLE)
    result = apply_stubbed(client, [decision(i, "wait") for i in ids], images, book)
    assert len(result.results) == 1001 and result.failed == 0
    assert len(book.read_all().items) == 1001


def test_permission_tags_split_at_256_characters_and_read_back() -> None:
    grants = [LaunchPermission(kind="user", value=f"{n:012d}") for n in range(100000000001, 100000000031)]
    grants.append(
        LaunchPermission(kind="ou", value="arn:aws:organizations::123456789012:ou/o-abc/ou-ab12-cd34ef56")
    )
    tags = permission_tags(grants)
    assert list(tags) == [PRIOR_PERMISSIONS_TAG, f"{PRIOR_PERMISSIONS_TAG}:2", f"{PRIOR_PERMISSIONS_TAG}:3"]
    assert all(len(v) <= 256 for v in tags.values())
    assert recorded_permissions({**tags, "Other": "x"}) == sorted(grants, key=lambda g: g.key)
    assert permission_tags([]) == {PRIOR_PERMISSIONS_TAG: ""}
    assert recorded_permissions({PRIOR_PERMISSIONS_TAG: ""}) == []


def test_a_dry_run_plan_is_refused_and_skipped_regions_are_left_alone(fake_aws_env: None) -> None:
    def no_ledger(region: str) -> Ledger:
        raise AssertionError(f"no ledger of {region} is needed")

    plan = make_plan([]).model_copy(update={"mode": "dry-run"})
    with pytest.raises(ValueError, match="enforce"):
        apply_plan(plan, {}, lambda region: RegionClients(region), NOW, ledger_for=no_ledger)
    skipped = make_plan([decision("ami-0aaaaaaaaaaaaaaa1", "deregister", ALL_STAGES)]).model_copy(
        update={"regions": [RegionStatus(region=REGION, status="skipped", error="ASG source failed")]}
    )
    assert (
        apply_plan(skipped, {}, lambda region: RegionClients(region), NOW, ledger_for=no_ledger).results == []
    )


def test_a_rescue_failing_half_way_says_what_it_did_and_leaves_the_clock_open(
    stubbed: tuple[Any, Stubber],
) -> None:
    client, stub = stubbed
    item = clocked(
        "ami-0aaaaaaaaaaaaaaa1",
        stages={"disable": LedgerStage(at=CLOCK_START, prior_launch_permissions=(f"user:{ACCOUNT_A}",))},
    )
    book = stub_ledger(client, item)
    image = stub_image(state="disabled", ledger=item)
    stub.add_response("enable_image", {"Return": True}, {"ImageId": image.image_id})
    stub.add_client_error("modify_image_attribute", "RequestLimitExceeded", "slow down")

    (result,) = rescue_image(RegionClients(REGION, ec2=client, dynamodb=dynamodb()), book, image, FIXED_NOW)

    assert (result.status, result.detail) == ("failed", "enabled")
    assert "RequestLimitExceeded" in (result.error or "")
    # EC2 is not back yet: the clock stays open for the next run's rescue.
    assert book.read_all().items[image.image_id].closed is None


def test_an_unreadable_ledger_record_fails_the_rescue_not_the_run(stubbed: tuple[Any, Stubber]) -> None:
    client, stub = stubbed
    bad = stub_image()
    forged = stub_image(image_id="ami-0aaaaaaaaaaaaaaa2", tags={PRIOR_PERMISSIONS_TAG: "bogus:1234"})
    book = stub_ledger(
        client,
        clocked(
            bad.image_id,
            stages={"disable": LedgerStage(at=CLOCK_START, prior_launch_permissions=("bogus:1234",))},
        ),
        clocked(forged.image_id),
    )
    # A forged tag the janitor cannot read is never read: only removed.
    stub.add_response(
        "delete_tags", {}, {"Resources": [forged.image_id], "Tags": [{"Key": PRIOR_PERMISSIONS_TAG}]}
    )
    result = apply_stubbed(
        client, [decision(i.image_id, "rescue") for i in (bad, forged)], [bad, forged], book
    )
    assert [r.status for r in result.results] == ["failed", "ok"]
    items = book.read_all().items
    assert items[bad.image_id].closed is None and items[forged.image_id].closed == FIXED_NOW


def test_rescue_unmarks_the_snapshots_of_a_half_done_deregistration(ec2: Any) -> None:
    image_id = make_image(ec2, "web-half-done")
    snapshot = snapshot_of(ec2, image_id)
    ec2.enable_image_deregistration_protection(ImageId=image_id)
    # A deregistration recorded and marked the snapshot, then EC2 refused it; the AMI came back into use.
    assert apply(ec2, [decision(image_id, "deregister", ALL_STAGES)], load_inventory(ec2)).failed == 1
    assert _tags(ec2.describe_snapshots(SnapshotIds=[snapshot])["Snapshots"][0]) == {
        RETIRED_FROM_TAG: image_id
    }
    image = image_in(load_inventory(ec2), image_id)

    (result,) = rescue_image(RegionClients(REGION, ec2=ec2, dynamodb=dynamodb()), ledger_of(ec2), image, NOW)

    assert result.status == "ok" and "snapshots unmarked" in (result.detail or "")
    assert _tags(ec2.describe_snapshots(SnapshotIds=[snapshot])["Snapshots"][0]) == {}
    # A later deregistration by hand leaves the snapshot alone: the ledger closed the clock.
    ec2.disable_image_deregistration_protection(ImageId=image_id)
    ec2.deregister_image(ImageId=image_id)
    inventory = load_inventory(ec2)
    assert inventory.retired_snapshots == () and trust.unfinished_snapshots(inventory) == []
    assert apply(ec2, [], inventory).results == [] and snapshot in snapshot_ids(ec2)


# ---- a stage the policy turns on after a later one was recorded -----------------------------------

# The family's lifecycle before and after its owner turns the deprecate stage on (it was null).
WITHOUT_DEPRECATE: list[tuple[Stage, int]] = [("disable", 0), ("deregister", 30)]
WITH_DEPRECATE: list[tuple[Stage, int]] = [("deprecate", 0), ("disable", 0), ("deregister", 30)]


def _disabled_then_deprecate_turned_on(ec2: Any) -> str:
    """An AMI disabled under `deprecate_after_days: null`, then run again once the policy turns the
    deprecate stage on: one janitor, no other run ever writes its item."""
    image_id = make_image(ec2, "web-1")
    inventory = load_inventory(ec2)
    first = planned(image_in(inventory, image_id), WITHOUT_DEPRECATE)
    assert first.stages == ["disable"]
    assert by_key(apply(ec2, [first], inventory))[(image_id, "disable")].status == "ok"

    inventory = load_inventory(ec2)
    second = planned(image_in(inventory, image_id), WITH_DEPRECATE)
    # The AMI is past the stage the policy turned on: it is not deprecated after its disable.
    assert second.stages == []
    assert apply(ec2, [second], inventory).results == []
    return image_id


def test_the_deregister_stage_follows_a_disable_whose_deprecate_stage_was_turned_on_later(ec2: Any) -> None:
    image_id = _disabled_then_deprecate_turned_on(ec2)
    later = NOW + timedelta(days=31)
    inventory = load_inventory(ec2)
    third = planned(image_in(inventory, image_id), WITH_DEPRECATE, now=later)
    assert third.stages == ["deregister"]

    result = by_key(apply(ec2, [third], inventory, now=later))[(image_id, "deregister")]

    # No other run exists: the ledger must not answer "recorded by another run".
    assert result.status == "ok", result
    assert set(items_of(ec2)[image_id].stages) == {"disable", "deregister"}


def test_a_stage_recorded_before_the_last_keeps_the_last_so_a_rescue_closes_the_clock(ec2: Any) -> None:
    # A table written before stages were kept in order (or by a run of another version): the deprecate
    # stage recorded after the disable. The ledger keeps the latest stage as the last, as the item is
    # read back, so the rescue's close (conditional on it) passes.
    image_id = make_image(ec2, "web-1")
    inventory = load_inventory(ec2)
    first = planned(image_in(inventory, image_id), WITHOUT_DEPRECATE)
    assert by_key(apply(ec2, [first], inventory))[(image_id, "disable")].status == "ok"
    book = ledger_of(ec2)
    assert book.record_stage(image_id, "deprecate", NOW, Prior(), previous="disable") == "recorded"
    image = image_in(load_inventory(ec2), image_id)
    assert image.ledger is not None and set(image.ledger.stages) == {"deprecate", "disable"}
    clients = RegionClients("us-east-1", ec2=ec2, dynamodb=book.clients.dynamodb)

    [result] = rescue_image(clients, book, image, NOW + timedelta(hours=2))

    assert result.status == "ok", result
    assert trust.open_item(image_in(load_inventory(ec2), image_id)) is None  # the clock is closed


def _recorded_out_of_order_by_an_older_version(ec2: Any) -> str:
    """A table an older version wrote: the deprecate stage recorded after the disable, and the table's
    last_stage moved back to deprecate (record_stage moved it to whatever it recorded)."""
    image_id = make_image(ec2, "web-1")
    inventory = load_inventory(ec2)
    first = planned(image_in(inventory, image_id), WITHOUT_DEPRECATE)
    assert by_key(apply(ec2, [first], inventory))[(image_id, "disable")].status == "ok"
    book = ledger_of(ec2)
    assert book.record_stage(image_id, "deprecate", NOW, Prior(), previous="disable") == "recorded"
    dynamodb().update_item(
        TableName=TABLE,
        Key={"pk": {"S": f"image#{image_id}"}, "sk": {"S": "item"}},
        UpdateExpression="SET last_stage = :stage",
        ExpressionAttributeValues={":stage": {"S": "deprecate"}},
    )
    return image_id


def test_an_item_recorded_out_of_order_by_an_older_version_goes_on_to_its_deregister_stage(ec2: Any) -> None:
    # Its writes compare with the table's last stage as read, not the latest by order: the next stage
    # is recorded (no "recorded by another run") and the table's last stage is the latest again.
    image_id = _recorded_out_of_order_by_an_older_version(ec2)
    later = NOW + timedelta(days=31)
    inventory = load_inventory(ec2)
    third = planned(image_in(inventory, image_id), WITH_DEPRECATE, now=later)
    assert third.stages == ["deregister"]

    result = by_key(apply(ec2, [third], inventory, now=later))[(image_id, "deregister")]

    assert result.status == "ok", result
    raw = dynamodb().get_item(TableName=TABLE, Key={"pk": {"S": f"image#{image_id}"}, "sk": {"S": "item"}})
    assert raw["Item"]["last_stage"] == {"S": "deregister"}


def test_an_item_recorded_out_of_order_by_an_older_version_is_closed_by_its_rescue(ec2: Any) -> None:
    image_id = _recorded_out_of_order_by_an_older_version(ec2)
    book = ledger_of(ec2)
    image = image_in(load_inventory(ec2), image_id)
    clients = RegionClients("us-east-1", ec2=ec2, dynamodb=book.clients.dynamodb)

    [result] = rescue_image(clients, book, image, NOW + timedelta(hours=2))

    assert result.status == "ok", result
    assert trust.open_item(image_in(load_inventory(ec2), image_id)) is None  # the clock is closed
    assert ec2.describe_images(ImageIds=[image_id])["Images"][0]["State"] == "available"


def test_a_stage_done_again_by_two_concurrent_runs_is_recorded_once(ec2: Any) -> None:
    """Two runs (the slice worker and an operator's `apply`, say) both read the AMI before either acts,
    and both would do its recorded disable again. The first records what DisableImage removes (the share
    the owner made since); the second, reading the launch permissions only when it comes to the AMI
    (none by then), must not write its redo over the first's: a rescue would not give the share back."""
    image_id = make_image(ec2, "web-1", share_with=[{"UserId": ACCOUNT_A}])
    book = ledger_of(ec2)
    # Deprecated and disabled by the janitor twelve hours ago, A's share recorded; the owner has since
    # enabled the AMI and shared it with B as well.
    recent = NOW - timedelta(hours=12)
    seed(book, image_id, ["deprecate", "disable"], at=recent, permissions=(f"user:{ACCOUNT_A}",))
    assert book.confirm_stage(image_id, "deprecate", recent) == "recorded"
    assert book.confirm_stage(image_id, "disable", recent) == "recorded"
    ec2.enable_image_deprecation(ImageId=image_id, DeprecateAt=deprecate_at(recent))
    ec2.modify_image_attribute(ImageId=image_id, LaunchPermission={"Add": [{"UserId": ACCOUNT_B}]})
    configured: list[tuple[Stage, int]] = [("deprecate", 0), ("disable", 0), ("deregister", 30)]
    first_read, second_read = load_inventory(ec2), load_inventory(ec2)
    for read in (first_read, second_read):
        assert planned(image_in(read, image_id), configured).stages == ["disable"]

    (first,) = apply_stages(REGION, ec2, ledger_of(ec2), first_read, [(image_id, ("disable",), None)], NOW)
    assert first.status == "ok", first
    both = (f"user:{ACCOUNT_A}", f"user:{ACCOUNT_B}")
    assert items_of(ec2)[image_id].stages["disable"].prior_launch_permissions == both

    # The second run comes to the AMI now, on its read from before the first run disabled it.
    (second,) = apply_stages(
        REGION, ec2, ledger_of(ec2), second_read, [(image_id, ("disable",), None)], LATER
    )

    assert second.status == "skipped", second
    assert items_of(ec2)[image_id].stages["disable"].prior_launch_permissions == both
    # So the rescue, when the AMI is back in use, gives back the share the owner made since.
    image = image_in(load_inventory(ec2), image_id)
    (rescued,) = rescue_image(
        RegionClients(REGION, ec2=ec2, dynamodb=dynamodb()), ledger_of(ec2), image, LATER
    )
    assert rescued.status == "ok", rescued
    shares = ec2.describe_image_attribute(ImageId=image_id, Attribute="launchPermission")
    assert sorted(p["UserId"] for p in shares["LaunchPermissions"]) == [ACCOUNT_A, ACCOUNT_B]
