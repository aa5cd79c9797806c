"""A tag-writer never moves a family's SSM parameter back to an older AMI (hypothesis).

Families told apart by tags (one name glob, a tag key each), with a parameter per architecture or one
for every architecture, a region whose parameters name each family's newest AMI, then any retagging of
those AMIs: a tag taken off, another family's put on, several
families' at once. Whatever the tags now say, the plan never moves a parameter from the available,
undeprecated AMI it names to an older one: only EC2's facts (that AMI disabled, deprecated or gone) or
a person may. `make test` runs a quick profile; `make fuzz` runs 10,000 examples.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from ami_janitor.core.model import Image, Plan, RegionInventory
from ami_janitor.core.planner import order_key
from ami_janitor.core.policy import Policy, parse_policy
from ami_janitor.core.run_plan import plan_run
from builders import NOW, image

TEAMS = ("a", "b", "c", "d")


# A family's Latest: none, a parameter per architecture, or one parameter for every architecture.
LATEST = (None, "/ami/{team}/{{arch}}", "/ami/{team}")


def _parameter(template: str, team: str, arch: str) -> str:
    return template.format(team=team).replace("{arch}", arch)


def _policy(latest: tuple[str | None, ...]) -> Policy:
    families: list[dict[str, Any]] = []
    for team, template in zip(TEAMS, latest, strict=False):
        family: dict[str, Any] = {"name": team, "match": {"tags": {f"Team-{team}": "1"}, "name": "svc-*"}}
        if template is not None:
            family["latest"] = {"tag": "Latest", "ssm_parameter": template.format(team=team)}
        families.append(family)
    return parse_policy(
        {
            "regions": ["us-east-1"],
            "defaults": {"keep_latest": 1, "min_age_days": 0},
            "families": families,
        }
    )


def _matches(tags: dict[str, str]) -> list[str]:
    return [team for team in TEAMS if tags.get(f"Team-{team}") == "1"]


@st.composite
def retagged_regions(draw: st.DrawFn) -> tuple[Policy, RegionInventory]:
    """A region in the steady state (each AMI in one family, each parameter on its family's newest
    available AMI of its architecture, or of all where it is one for every architecture), then retagged
    at random."""
    latest = tuple(draw(st.lists(st.sampled_from(LATEST), min_size=2, max_size=len(TEAMS))))
    policy = _policy(latest)
    teams = TEAMS[: len(latest)]
    before: list[Image] = []
    for n in range(draw(st.integers(1, 8))):
        team = draw(st.sampled_from(teams))
        before.append(
            image(
                name=f"svc-{n}",
                days_old=draw(st.integers(0, 40)) + n / 100,  # no two made the same instant
                arch=draw(st.sampled_from(["x86_64", "arm64"])),
                state=draw(st.sampled_from(["available", "available", "available", "disabled", "failed"])),
                tags={f"Team-{team}": "1"},
                **(
                    {"deprecation_time": NOW - timedelta(days=1)}
                    if draw(st.booleans()) and n % 3 == 0
                    else {}
                ),
            )
        )
    parameters: dict[str, str] = {}
    for team, template in zip(teams, latest, strict=True):
        if template is None:
            continue
        for arch in ("x86_64", "arm64"):
            members = [
                i
                for i in before
                if _matches(i.tags) == [team]
                and (i.architecture == arch or "{arch}" not in template)
                and i.state == "available"
                and not i.deprecated_at(NOW)
            ]
            if members:
                # (One parameter for several architectures' AMIs is a policy error, left where it was.)
                parameters[_parameter(template, team, arch)] = max(members, key=order_key).image_id
    after: list[Image] = []
    for old in before:
        kept = {k: v for k, v in old.tags.items() if not k.startswith("Team-") or draw(st.booleans())}
        added = {f"Team-{team}": "1" for team in draw(st.lists(st.sampled_from(teams), max_size=3))}
        after.append(old.model_copy(update={"tags": {**kept, **added}}))
    return policy, RegionInventory(region="us-east-1", images=tuple(after), parameters=parameters)


def planned(policy: Policy, inventory: RegionInventory) -> Plan:
    return plan_run([inventory], policy, NOW)


@given(retagged_regions())
def test_no_tag_moves_a_parameter_back_to_an_older_ami(region: tuple[Policy, RegionInventory]) -> None:
    policy, inventory = region
    images = {i.image_id: i for i in inventory.images}
    plan = planned(policy, inventory)
    for change in plan.latest:
        if change.ssm_parameter is None or change.to is None:
            continue
        named = images.get(inventory.parameters.get(change.ssm_parameter, ""))
        if named is None or named.state != "available" or named.deprecated_at(NOW):
            continue  # EC2's facts moved it: a parameter may then go to an older AMI
        assert order_key(images[change.to]) >= order_key(named), (
            f"{change.ssm_parameter} moved from {named.image_id} ({named.tags}) back to {change.to}"
        )
