"""The engine's entry points, shared by the CLI and the Lambda handlers: plan, apply, rescue, rotate."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime

from pydantic import BaseModel, Field

from ami_janitor import adapter, executor, planner, rotation
from ami_janitor.clients import RegionClients
from ami_janitor.executor import ActionResult, ApplyResult
from ami_janitor.model import Plan, RegionInventory
from ami_janitor.policy import Policy

ClientsFor = Callable[[str], RegionClients]

# What a cleanup run calls: the inventory, the executor and the rotation it reconciles first.
PERMISSIONS: list[str] = sorted(
    set(adapter.PERMISSIONS) | set(executor.PERMISSIONS) | set(rotation.PERMISSIONS)
)

UNCHECKED = "launch permissions not checked yet"


class RunResult(BaseModel):
    """A plan and what applying it did (empty results in dry-run)."""

    plan: Plan
    results: list[ActionResult] = Field(default_factory=list)
    rotations: list[rotation.RotationResult] = Field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(1 for r in self.results if r.status == "failed") + sum(
            1 for r in self.rotations if r.status == "failed"
        )

    @property
    def exit_code(self) -> int:
        skipped = any(region.status == "skipped" for region in self.plan.regions)
        return 1 if self.failed or skipped else 0

    def report(self) -> dict[str, object]:
        data = self.plan.to_dict()
        data["results"] = [r.model_dump(mode="json") for r in self.results]
        data["rotations"] = [r.model_dump(mode="json") for r in self.rotations]
        summary = dict(data["summary"])
        if self.results:
            summary["snapshots_deleted"] = sum(len(r.snapshots_deleted) for r in self.results)
        summary["actions_failed"] = self.failed
        data["summary"] = summary
        return data


def select_regions(policy: Policy, regions: Sequence[str] | None) -> list[str]:
    """The regions a run acts on: the ones asked for, else every managed region."""
    if not regions:
        return policy.managed_regions
    unknown = sorted(set(regions) - set(policy.managed_regions))
    if unknown:
        raise ValueError(
            f"region {unknown[0]} is not managed by the policy (managed: {', '.join(policy.managed_regions)})"
        )
    return sorted(set(regions))


def inventories(policy: Policy, regions: Iterable[str], clients_for: ClientsFor) -> list[RegionInventory]:
    return [adapter.load_inventory(clients_for(region), policy) for region in regions]


def build_plan(
    policy: Policy, regions: Sequence[str], clients_for: ClientsFor, now: datetime
) -> tuple[Plan, dict[str, RegionInventory]]:
    """Inventory every region, plan, then check launch permissions of the candidates only and replan.

    DescribeImageAttribute is one call per AMI, so it is made only for the AMIs a decision needs.
    """
    loaded = {inv.region: inv for inv in inventories(policy, regions, clients_for)}
    first = planner.plan(list(loaded.values()), policy, now)
    unchecked: dict[str, list[str]] = {}
    for decision in first.decisions:
        if UNCHECKED in decision.reasons:
            unchecked.setdefault(decision.region, []).append(decision.image_id)
    if not unchecked:
        return first, loaded
    for region, image_ids in unchecked.items():
        loaded[region] = adapter.load_launch_permissions(clients_for(region), loaded[region], image_ids)
    return planner.plan(list(loaded.values()), policy, now), loaded


def run(
    policy: Policy,
    regions: Sequence[str],
    clients_for: ClientsFor,
    now: datetime,
    *,
    apply: bool,
) -> RunResult:
    """A scheduled run: reconcile Latest first (so cleanup sees the current pointer), then clean up."""
    rotations: list[rotation.RotationResult] = []
    if apply:
        for region in regions:
            rotations.extend(rotation.converge(clients_for(region), policy, now))
    plan, loaded = build_plan(policy, regions, clients_for, now)
    if not apply:
        return RunResult(plan=plan, rotations=rotations)
    grants = {family.name: sorted(family.share_with.grants()) for family in policy.families}
    applied: ApplyResult = executor.apply_plan(plan, loaded, clients_for, now, family_grants=grants)
    return RunResult(plan=plan, results=applied.results, rotations=rotations)


def rescue(
    policy: Policy, image_id: str, regions: Sequence[str], clients_for: ClientsFor, now: datetime
) -> list[ActionResult]:
    """`ami-janitor rescue AMI_ID`: undo every stage on one AMI, wherever it is."""
    for region in regions:
        clients = clients_for(region)
        image = adapter.describe_image(clients, image_id)
        if image is None:
            continue
        grants: list[str] = []
        for family in policy.families:
            if family.match.matches(image.name, image.tags):
                grants.extend(sorted(family.share_with.grants()))
        return executor.rescue_image(clients, image, now, extra_grants=grants)
    raise LookupError(f"{image_id} was not found in {', '.join(regions)}")
