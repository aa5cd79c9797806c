"""A forged candidate clock on an AMI that no family selects when the first enforce run with a ledger
adopts the janitor tags: the adopted clock stays open (no decision rescues it), and it counts once the
AMI joins a family."""

from __future__ import annotations

from datetime import timedelta

from ami_janitor.core import trust
from ami_janitor.core.model import Image, LedgerView
from ami_janitor.core.planner import plan
from ami_janitor.core.policy import CANDIDATE_TAG, Policy
from builders import NOW, image, inventory, policy

FORGED = {CANDIDATE_TAG: "2020-01-01T00:00:00Z"}


def _adopt_then_plan_later(
    images: list[Image], at_adoption: Policy, later_policy: Policy, days: int
) -> dict[str, str]:
    view = trust.adopted_view(inventory(*images, ledger=LedgerView(table="t")), at_adoption, NOW)
    adopting = dict(view.ledger.adopting) if view.ledger is not None else {}
    first = plan([view], at_adoption, NOW)
    # Nothing in the adopting run decides about (and so rescues or closes) the AMIs outside the family.
    assert not {i.image_id for i in images} & {d.image_id for d in first.decisions}
    ledger = LedgerView(table="t", items=adopting, adopted=NOW)
    attached = [i.model_copy(update={"ledger": adopting.get(i.image_id)}) for i in images]
    result = plan([inventory(*attached, ledger=ledger)], later_policy, NOW + timedelta(days=days))
    return {d.image_id: d.action for d in result.decisions}


def test_a_forged_clock_adopted_outside_any_family_does_not_deprecate_sooner() -> None:
    lifecycle = {"deprecate_after_days": 30, "disable_after_days": 37, "deregister_after_days": 44}
    app = policy(defaults={"lifecycle": lifecycle})  # family `app` only: app-*
    forged = image(days_old=200, name="web-forged", tags=FORGED)
    twin = image(days_old=201, name="web-twin")
    newer = [image(days_old=100 + i, name=f"web-{i}") for i in range(2)]
    # 30 days on, a `web` family is added (or the AMIs enrolled): both become candidates now.
    web = policy({"name": "web", "match": {"name": "web-*"}}, defaults={"lifecycle": lifecycle})
    actions = _adopt_then_plan_later([forged, twin, *newer], app, web, 30)
    assert actions[twin.image_id] == "wait"
    assert actions[forged.image_id] == actions[twin.image_id], actions


def test_a_forged_clock_adopted_outside_any_family_does_not_deregister_at_once() -> None:
    app = policy()  # deprecate 0, disable 7, deregister 14 days after an AMI becomes a candidate
    # Deprecated and disabled by their owner, outside the family; one carries a forged clock.
    owner = {"state": "disabled", "deprecation_time": NOW - timedelta(days=2)}
    forged = image(days_old=200, name="web-forged", tags=FORGED, **owner)
    twin = image(days_old=201, name="web-twin", **owner)
    newer = [image(days_old=100 + i, name=f"web-{i}") for i in range(2)]
    web = policy({"name": "web", "match": {"name": "web-*"}})
    actions = _adopt_then_plan_later([forged, twin, *newer], app, web, 30)
    assert actions[twin.image_id] != "deregister"
    assert actions[forged.image_id] != "deregister", actions
