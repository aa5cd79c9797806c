"""Planner cases: every keep rule, reason, stage, cap and rescue."""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

from ami_janitor.core import run_plan, trust
from ami_janitor.core.model import (
    BuildInstance,
    Decision,
    LaunchPermission,
    LedgerSnapshot,
    LedgerView,
    Plan,
    RetiredSnapshot,
    ScheduledBake,
    iso,
)
from ami_janitor.core.planner import plan
from ami_janitor.core.policy import (
    CANDIDATE_TAG,
    PRIOR_DEPRECATION_TAG,
    SHARED_BY_JANITOR_TAG,
    Policy,
)
from ami_janitor.core.sharing import share_for
from builders import ADOPTED, NOW, copied, granted, image, inventory, ledger_item, policy, reference

ALL_ZERO = {"lifecycle": {"deprecate_after_days": 0, "disable_after_days": 0, "deregister_after_days": 0}}


def by_id(result: Plan) -> dict[str, Decision]:
    return {d.image_id: d for d in result.decisions}


def test_keep_latest_per_group_and_candidates_get_reasons() -> None:
    images = [image(days_old=100 + i) for i in range(4)]
    result = by_id(plan([inventory(*images)], policy(), NOW))
    assert result[images[0].image_id].action == "keep"
    assert "among the 2 newest of its group (#1)" in result[images[0].image_id].reasons
    assert "among the 2 newest of its group (#2)" in result[images[1].image_id].reasons
    old = result[images[3].image_id]
    assert old.action == "deprecate"
    assert "not among the 2 newest of its group" in old.reasons
    assert "older than 30 days" in old.reasons
    assert old.next_action == "disable"
    assert old.next_action_at == iso(NOW + timedelta(days=7))


def test_groups_are_per_architecture() -> None:
    x86 = [image(days_old=100 + i) for i in range(3)]
    arm = [image(days_old=100 + i, arch="arm64") for i in range(3)]
    result = by_id(plan([inventory(*x86, *arm)], policy(), NOW))
    assert [result[i.image_id].action for i in x86] == ["keep", "keep", "deprecate"]
    assert [result[i.image_id].action for i in arm] == ["keep", "keep", "deprecate"]


def test_amis_created_at_the_same_time_rank_by_name_then_id() -> None:
    # keep_latest 2 of four AMIs made the same second: the two greatest names are the newest.
    same = [image(days_old=100, name=name) for name in ("app-b", "app-d", "app-a", "app-c")]
    twins = [image(days_old=100, name="app-e", image_id=f"ami-{n:017x}") for n in (0xF1, 0xF2)]
    result = by_id(plan([inventory(*same)], policy(), NOW))
    assert {i.name for i in same if result[i.image_id].action == "keep"} == {"app-c", "app-d"}
    assert "among the 2 newest of its group (#1)" in result[same[1].image_id].reasons
    result = by_id(plan([inventory(*twins, image(days_old=200))], policy(), NOW))
    assert "among the 2 newest of its group (#1)" in result[twins[1].image_id].reasons


def test_the_latest_tag_moves_from_every_holder_newest_first() -> None:
    holders = [image(days_old=d, tags={"Latest": "true"}) for d in (50, 3, 20)]
    newest = image(days_old=1)
    family = {"latest": {"tag": "Latest"}}
    (change,) = plan([inventory(*holders, newest)], policy(family), NOW).latest
    assert change.to == newest.image_id
    assert change.from_ == holders[1].image_id
    assert change.untag == [holders[1].image_id, holders[2].image_id, holders[0].image_id]


def test_min_age_keeps_young_amis() -> None:
    images = [image(days_old=d) for d in (1, 2, 3, 40)]
    result = by_id(plan([inventory(*images)], policy(), NOW))
    assert result[images[2].image_id].action == "keep"
    assert any(r.startswith("younger than 30 days") for r in result[images[2].image_id].reasons)
    assert result[images[3].image_id].action == "deprecate"


def test_replica_age_comes_from_its_source() -> None:
    # Copied yesterday, but its source is 200 days old: old, and ordered behind newer sources.
    replica = copied("ami-source", "us-west-2", NOW - timedelta(days=200), days_old=1)
    newer = [image(days_old=100), image(days_old=101)]
    result = by_id(plan([inventory(replica, *newer)], policy(), NOW))
    assert result[replica.image_id].action == "deprecate"
    assert result[replica.image_id].source_image_id == "ami-source"
    assert [d.image_id for d in plan([inventory(replica, *newer)], policy(), NOW).decisions][-1] == (
        replica.image_id
    )


def test_a_copy_made_by_hand_counts_from_its_source_as_ec2_reports_it() -> None:
    """Not the janitor's copy (the ledger has no record): the inventory read its source's creation, so
    a copy made today of a 300-day-old AMI is neither young, nor the newest, nor Latest."""
    originals = [image(days_old=40 + 10 * n) for n in range(3)]
    late = copied("ami-0000000000000beef", "eu-west-1", NOW, recorded=False, days_old=0.1)
    aged = late.model_copy(update={"copied_from_created": NOW - timedelta(days=300)})
    pol = policy({"latest": {"tag": "Latest", "ssm_parameter": "/ami/app/latest"}})

    result = plan([inventory(*originals, aged)], pol, NOW)

    decisions = by_id(result)
    assert [c.to for c in result.latest] == [originals[0].image_id]
    assert decisions[aged.image_id].action == "deprecate"
    assert [decisions[i.image_id].action for i in originals] == ["keep", "keep", "deprecate"]
    # Without its source's creation it counts from its own (young: kept), as before any read.
    unknown = by_id(plan([inventory(*originals, late)], pol, NOW))[late.image_id]
    assert unknown.action == "keep" and any(r.startswith("younger than") for r in unknown.reasons)


def test_references_keep_with_their_detail() -> None:
    images = [image(days_old=100 + i) for i in range(3)]
    detail = "referenced by launch template lt-0abc (web) version 3"
    inv = inventory(*images, references=(reference(images[2].image_id, detail, "launch-template"),))
    decision = by_id(plan([inv], policy(), NOW))[images[2].image_id]
    assert decision.action == "keep"
    assert detail in decision.reasons


def test_latest_tag_and_pointer_are_judged_after_this_runs_rotation() -> None:
    images = [image(days_old=100 + i) for i in range(4)]
    stale = image(days_old=300, tags={"Latest": "true"})
    inv = inventory(*images, stale, parameters={"/ami/app/latest": images[3].image_id})
    pol = policy({"latest": {"tag": "Latest", "ssm_parameter": "/ami/app/latest"}})
    result = plan([inv], pol, NOW)
    decisions = by_id(result)
    # The rotation moves the tag and the parameter to the newest first: their old holders are not kept
    # by them (an enforce run writes Latest before any stage).
    assert decisions[stale.image_id].action == "deprecate"
    assert decisions[images[3].image_id].action == "deprecate"
    assert "Latest of its group" in decisions[images[0].image_id].reasons
    assert "value of SSM parameter /ami/app/latest" in decisions[images[0].image_id].reasons
    [change] = result.latest
    assert (change.from_, change.to, change.untag) == (stale.image_id, images[0].image_id, [stale.image_id])
    assert result.to_dict()["latest"][0]["from"] == stale.image_id


def test_a_latest_tag_the_run_cannot_rotate_keeps_its_holder() -> None:
    x86 = [image(days_old=100 + i) for i in range(3)]
    stale = image(days_old=300, tags={"Latest": "true"})
    arm = image(days_old=100, arch="arm64")
    # One parameter for two architectures: a policy error, so this family is not rotated.
    pol = policy({"latest": {"tag": "Latest", "ssm_parameter": "/ami/app/latest"}})
    result = plan([inventory(*x86, stale, arm)], pol, NOW)
    assert result.latest == []
    assert "carries the Latest tag" in by_id(result)[stale.image_id].reasons


def test_latest_follows_a_rescue_of_the_newest() -> None:
    older = image(days_old=100, tags={"Latest": "true"})
    rescued = image(
        days_old=90,
        state="disabled",
        tags={"Keep": "yes"},
        ledger=ledger_item(24, {"deprecate": 20, "disable": 10}),
    )
    pol = policy({"latest": {"tag": "Latest"}, "opt_out_tag": "Keep"})
    result = plan([inventory(older, rescued)], pol, NOW)
    assert by_id(result)[rescued.image_id].action == "rescue"
    [change] = result.latest
    assert (change.from_, change.to, change.untag) == (older.image_id, rescued.image_id, [older.image_id])


def test_a_rescue_leaves_stages_adopted_from_tags_as_ec2_shows_them() -> None:
    # Disabled and deprecated by anyone; the tags say the janitor did it. Adopted, then rescued (opted
    # out): the rescue enables nothing, so Latest does not follow it and stays where it is.
    older = image(days_old=100, tags={"Latest": "true"})
    tagged = image(
        days_old=90,
        state="disabled",
        deprecation_time=NOW - timedelta(days=3),
        tags={CANDIDATE_TAG: "2020-01-01T00:00:00Z", PRIOR_DEPRECATION_TAG: "none", "Keep": "yes"},
    )
    pol = policy({"latest": {"tag": "Latest"}, "opt_out_tag": "Keep"})
    view = trust.adopted_view(inventory(older, tagged, ledger=LedgerView(table="t")), pol, NOW)
    adopted = {i.image_id: i for i in view.images}[tagged.image_id]
    assert adopted.ledger is not None
    assert all(entry.adopted for entry in adopted.ledger.stages.values())
    assert adopted.ledger.stages["disable"].already_disabled
    result = plan([view], pol, NOW)
    assert by_id(result)[tagged.image_id].action == "rescue"
    assert result.latest == []


def test_a_grant_a_tag_records_is_reported_never_adopted() -> None:
    """A candidate shared by hand with an account share_with lists, its tag saying the janitor made the
    grant. Adopted, the grant would be the janitor's: rescued once share_with no longer lists the
    account, the AMI would have it revoked, on a tag's word. It is reported and left instead."""
    partner = "111122223333"
    tagged = image(
        days_old=90,
        tags={CANDIDATE_TAG: "2020-01-01T00:00:00Z", SHARED_BY_JANITOR_TAG: f"user:{partner}"},
    )
    shared = policy({"share_with": {"accounts": [partner]}})
    view = trust.adopted_view(inventory(image(days_old=1), tagged, ledger=LedgerView(table="t")), shared, NOW)
    adopted = {i.image_id: i for i in view.images}[tagged.image_id]
    assert adopted.ledger is not None and adopted.ledger.grants == ()
    assert f"{tagged.image_id} grant user:{partner} (in share_with: a tag's record, never revoked)" in (
        " | ".join(view.notes)
    )
    rescued = adopted.model_copy(update={"ledger": adopted.ledger.model_copy(update={"closed": NOW})})
    assert share_for(rescued, policy({}).families[0]) is None


def test_latest_skips_disabled_and_deprecated() -> None:
    disabled = image(days_old=50, state="disabled")
    deprecated = image(days_old=60, deprecation_time=NOW - timedelta(days=1))
    available = image(days_old=70)
    pol = policy({"latest": {"tag": "Latest"}})
    [change] = plan([inventory(disabled, deprecated, available)], pol, NOW).latest
    assert change.to == available.image_id


def test_no_available_ami_removes_tag_with_warning() -> None:
    only = image(days_old=50, state="disabled", tags={"Latest": "true"})
    pol = policy({"latest": {"tag": "Latest", "ssm_parameter": "/p"}})
    [change] = plan([inventory(only)], pol, NOW).latest
    assert change.to is None and change.untag == [only.image_id] and change.warning


def test_pointer_without_arch_on_multi_arch_family_is_a_policy_error() -> None:
    pol = policy({"latest": {"tag": "Latest", "ssm_parameter": "/ami/app/latest"}})
    result = plan([inventory(image(arch="x86_64"), image(arch="arm64"))], pol, NOW)
    assert result.latest == []
    assert any("must contain {arch}" in e for e in result.policy_errors)
    ok = policy({"latest": {"tag": "Latest", "ssm_parameter": "/ami/app/{arch}/latest"}})
    params = {
        c.ssm_parameter for c in plan([inventory(image(arch="x86_64"), image(arch="arm64"))], ok, NOW).latest
    }
    assert params == {"/ami/app/x86_64/latest", "/ami/app/arm64/latest"}


def test_a_pointer_without_arch_is_judged_per_region_as_each_function_plans_it() -> None:
    """A parameter is regional: one region's x86_64 AMIs and another's arm64 ones ask for no {arch}."""
    pol = policy(
        {"latest": {"tag": "Latest", "ssm_parameter": "/ami/app/latest"}}, regions=["us-east-1", "eu-west-1"]
    )
    us = inventory(image(arch="x86_64"))
    eu = inventory(image(arch="arm64", region="eu-west-1"), region="eu-west-1")
    both, alone = plan([us, eu], pol, NOW), plan([us], pol, NOW)
    assert both.policy_errors == alone.policy_errors == []
    assert [c.region for c in both.latest] == ["eu-west-1", "us-east-1"]
    assert [c.region for c in alone.latest] == ["us-east-1"]


def test_recent_launch_keeps() -> None:
    images = [image(days_old=100 + i) for i in range(3)]
    launched = image(days_old=200, last_launched=NOW - timedelta(days=3))
    decision = by_id(plan([inventory(*images, launched)], policy(), NOW))[launched.image_id]
    assert decision.action == "keep"
    assert any(r.startswith("launched ") for r in decision.reasons)


def test_foreign_share_and_public_keep_unless_allowed() -> None:
    images = [image(days_old=100 + i) for i in range(2)]
    foreign = image(days_old=200, perms=("user:999988887777",))
    listed = image(days_old=201, perms=("user:123456789012",))
    public = image(days_old=202, public=True, perms=("group:all",))
    inv = inventory(*images, foreign, listed, public)
    pol = policy({"share_with": {"accounts": ["123456789012"]}})
    decisions = by_id(plan([inv], pol, NOW))
    assert decisions[foreign.image_id].action == "keep"
    assert "shared with user:999988887777 (not in share_with)" in decisions[foreign.image_id].reasons
    assert decisions[listed.image_id].action == "deprecate"
    assert decisions[public.image_id].reasons == ["public (the family does not set public: true)"]
    allowed = by_id(plan([inv], policy({"allow_shared": True}), NOW))
    assert allowed[foreign.image_id].action == "deprecate"
    assert allowed[public.image_id].action == "deprecate"


def test_grants_the_janitor_made_are_not_foreign() -> None:
    images = [image(days_old=100 + i) for i in range(2)]
    own = granted(
        image(days_old=200, perms=("user:111111111111",), tags={SHARED_BY_JANITOR_TAG: "user:111111111111"}),
        "user:111111111111",
    )
    assert by_id(plan([inventory(*images, own)], policy(), NOW))[own.image_id].action == "deprecate"


def test_a_grant_found_in_place_is_not_the_janitors_and_keeps_the_candidate_once_unlisted() -> None:
    # Shared by hand with C before share_with listed C: the ledger records it found, not granted, so once
    # share_with drops C the share keeps the AMI (the disable stage would remove it).
    images = [image(days_old=100 + i) for i in range(2)]
    found = image(days_old=200, perms=("user:111111111111", "user:333333333333"))
    found = granted(found, "user:111111111111")
    assert found.ledger is not None
    found = found.model_copy(
        update={"ledger": found.ledger.model_copy(update={"grants_found": ("user:333333333333",)})}
    )
    decision = by_id(
        plan([inventory(*images, found)], policy({"share_with": {"accounts": ["111111111111"]}}), NOW)
    )
    assert (decision[found.image_id].action, decision[found.image_id].reasons) == (
        "keep",
        ["shared with user:333333333333 (not in share_with)"],
    )


def test_unread_launch_permissions_are_asked_for_then_settle_the_plan() -> None:
    images = [image(days_old=100 + i) for i in range(2)]
    unknown = image(days_old=200, perms=None)
    touched = image(days_old=210, perms=None, tags={"ami-janitor:candidate-since": "2026-11-01T00:00:00Z"})
    pol = policy({"share_with": {"accounts": ["111122223333"]}})
    inv = inventory(*images, unknown, touched)
    first = run_plan.plan_run([inv], pol, NOW)
    assert by_id(first)[unknown.image_id].action == "deprecate"
    assert run_plan.needed_details(first, {inv.region: inv}) == {
        "us-east-1": sorted([unknown.image_id, touched.image_id])
    }
    # The edge reads them: one is shared with an account share_with does not list, one only with ours.
    read = {unknown.image_id: ("user:999988887777",), touched.image_id: ("user:111122223333",)}
    loaded = inv._replace(
        images=tuple(
            i.model_copy(
                update={"launch_permissions": tuple(LaunchPermission.from_key(k) for k in read[i.image_id])}
            )
            if i.image_id in read
            else i
            for i in inv.images
        )
    )
    settled_plan = run_plan.settle(first, {inv.region: loaded}, pol)
    # The forged clock tag on `touched` stays reported through the settling.
    assert first.summary.tampered == settled_plan.summary.tampered == 1
    settled = by_id(settled_plan)
    assert (settled[unknown.image_id].action, settled[unknown.image_id].reasons) == (
        "keep",
        ["shared with user:999988887777 (not in share_with)"],
    )
    assert settled[touched.image_id].action == by_id(first)[touched.image_id].action
    # Planned to retire, it had no share; kept, it gets the family's share_with as any kept member does.
    assert unknown.image_id not in {s.image_id for s in first.shares}
    [share] = [s for s in settled_plan.shares if s.image_id == unknown.image_id]
    assert share.add == ["user:111122223333"] and share.remove == []
    order = [d.image_id for d in settled_plan.decisions]
    assert [s.image_id for s in settled_plan.shares] == sorted(
        (s.image_id for s in settled_plan.shares), key=order.index
    )


def test_opt_out_and_protection_keep() -> None:
    images = [image(days_old=100 + i) for i in range(2)]
    opted = image(days_old=200, tags={"ami-janitor:keep": ""})
    protected = image(days_old=201, deregistration_protection=True)
    decisions = by_id(plan([inventory(*images, opted, protected)], policy(), NOW))
    assert decisions[opted.image_id].reasons == ["opted out (tag ami-janitor:keep)"]
    assert decisions[protected.image_id].reasons == ["deregistration protection is on"]
    custom = by_id(plan([inventory(*images, opted)], policy({"opt_out_tag": "Keep"}), NOW))
    assert custom[opted.image_id].action == "deprecate"


def test_two_families_keep_and_report() -> None:
    both = image(days_old=300, name="app-shared-1")
    pol = policy(
        families=[
            {"name": "app", "match": {"tags": {"Project": "App"}}},
            {"name": "shared", "match": {"name": "app-shared-*"}},
        ]
    )
    result = plan([inventory(both)], pol, NOW)
    [decision] = result.decisions
    assert decision.action == "keep" and decision.family == "app"
    assert decision.reasons[0] == "matches several families (app, shared): policy error"
    assert result.policy_errors == [f"{both.image_id} matches several families (app, shared): kept"]


def two_families(a: dict[str, Any], b: dict[str, Any]) -> Policy:
    latest = {"tag": "Latest"}
    return policy(
        families=[
            {"name": "a", "match": a, "latest": {**latest, "ssm_parameter": "/ami/a"}},
            {"name": "b", "match": b, "latest": {**latest, "ssm_parameter": "/ami/b"}},
        ]
    )


def test_an_ami_of_two_families_takes_no_keep_slot_and_no_latest() -> None:
    pol = two_families({"name": "app-*"}, {"tags": {"Team": "X"}})
    own = [image(days_old=100 + 10 * n, name=f"app-{n}", tags={}) for n in range(3)]
    both = image(days_old=90, name="app-other", tags={"Team": "X", "Latest": "true"})  # a by name, b by tag

    result = plan([inventory(*own, both, parameters={"/ami/a": own[0].image_id})], pol, NOW)

    decisions = by_id(result)
    assert decisions[both.image_id].action == "keep"
    # The two newest of a's own AMIs keep their ranks: the contested one holds none.
    assert [decisions[i.image_id].reasons[0] for i in own[:2]] == [
        "among the 2 newest of its group (#1)",
        "among the 2 newest of its group (#2)",
    ]
    assert decisions[own[2].image_id].action == "deprecate"
    # a's Latest moves neither to it nor back past it; the tag stays on it, the parameter as it is.
    assert result.latest == []
    assert f"family a (x86_64) in us-east-1: {both.image_id}" in result.policy_errors[0]
    assert "Latest not rotated" in result.policy_errors[0]


def test_a_tag_that_enrolls_a_familys_newest_elsewhere_moves_its_latest_nowhere() -> None:
    pol = two_families({"tags": {"Team": "X"}}, {"name": "app-*", "tags": {"Project": "App"}})
    newest, older, oldest = (image(days_old=100 + 10 * n, name=f"app-{n}") for n in range(3))
    current = {"parameters": {"/ami/b": newest.image_id}}
    before = plan(
        [
            inventory(
                newest.model_copy(update={"tags": {**newest.tags, "Latest": "true"}}),
                older,
                oldest,
                **current,
            )
        ],
        pol,
        NOW,
    )
    assert before.latest == []  # b's Latest is on its newest

    tagged = newest.model_copy(update={"tags": {**newest.tags, "Latest": "true", "Team": "X"}})
    after = plan([inventory(tagged, older, oldest, **current)], pol, NOW)

    assert after.latest == []  # neither /ami/b to an older AMI, nor /ami/a to b's
    decisions = by_id(after)
    assert decisions[tagged.image_id].action == "keep"
    assert {decisions[i.image_id].action for i in (older, oldest)} == {"keep"}
    assert any(e.startswith("family b (x86_64) in us-east-1") for e in after.policy_errors)


def test_an_older_ami_of_two_families_lets_latest_move_on() -> None:
    pol = two_families({"name": "app-*"}, {"tags": {"Team": "X"}})
    newest = image(days_old=50, name="app-2", tags={})
    both = image(days_old=90, name="app-other", tags={"Team": "X"})
    [change] = plan([inventory(newest, both)], pol, NOW).latest
    assert (change.family, change.to) == ("a", newest.image_id)


def test_an_older_ami_of_two_families_loses_a_latest_tag_it_carries() -> None:
    # A tagger's Latest tag on an old AMI, with a tag that enrolls it in b too: it is never a Latest
    # target, and the rotation of a, whose tag it carries, takes the tag back.
    pol = two_families({"name": "app-*"}, {"tags": {"Team": "X"}})
    newest = image(days_old=50, name="app-2", tags={})
    both = image(days_old=90, name="app-1", tags={"Team": "X", "Latest": "true"})
    [change] = plan([inventory(newest, both)], pol, NOW).latest
    assert (change.family, change.to, change.untag) == ("a", newest.image_id, [both.image_id])
    assert by_id(plan([inventory(newest, both)], pol, NOW))[both.image_id].action == "keep"


def test_a_tag_taken_off_a_familys_newest_moves_its_parameter_nowhere() -> None:
    # The family selects by name and tag: deleting the tag from its newest AMI, named by its parameter,
    # takes that AMI out of the family, but must not move the parameter back to an older AMI.
    pol = policy({"latest": {"tag": "Latest", "ssm_parameter": "/ami/app/latest"}})
    older = image(days_old=40, name="app-1")
    newest = image(days_old=10, name="app-2", tags={"Latest": "true"})
    current = {"parameters": {"/ami/app/latest": newest.image_id}}
    assert plan([inventory(older, newest, **current)], pol, NOW).latest == []

    untagged = newest.model_copy(update={"tags": {"Latest": "true"}})  # Project=App deleted
    result = plan([inventory(older, untagged, **current)], pol, NOW)
    assert result.latest == []
    assert any(
        f"/ami/app/latest names {newest.image_id}, newer than {older.image_id}" in e
        for e in result.policy_errors
    )
    # EC2's facts move it: that AMI disabled, or deprecated, Latest goes back to the older one.
    for fact in ({"state": "disabled"}, {"deprecation_time": NOW - timedelta(hours=1)}):
        gone = untagged.model_copy(update=fact)
        [change] = plan([inventory(older, gone, **current)], pol, NOW).latest
        assert change.to == older.image_id
    # A newer build of the family moves it on.
    build = image(days_old=1, name="app-3")
    [change] = plan([inventory(older, untagged, build, **current)], pol, NOW).latest
    assert change.to == build.image_id


def test_a_rescue_that_gives_another_architecture_a_latest_blocks_a_parameter_without_arch() -> None:
    # The arm64 group's only AMI, disabled by the janitor, is in use again and rescued: after the rescue
    # both architectures have an AMI Latest could name, so the one parameter names neither.
    pol = policy({"latest": {"tag": "Latest", "ssm_parameter": "/ami/app/latest"}})
    x86 = image(days_old=100, name="app-x86")
    arm = image(
        days_old=90,
        name="app-arm",
        arch="arm64",
        state="disabled",
        ledger=ledger_item(24, {"deprecate": 20, "disable": 10}),
    )
    result = plan([inventory(x86, arm, references=(reference(arm.image_id),))], pol, NOW)
    assert by_id(result)[arm.image_id].action == "rescue"
    assert [c for c in result.latest if c.ssm_parameter == "/ami/app/latest" and c.to] == []
    assert any("must contain {arch}" in e for e in result.policy_errors)


def test_a_failed_build_of_another_architecture_leaves_the_rotation_alone() -> None:
    # Only the architectures Latest could name count toward the parameter's `{arch}` rule.
    pol = policy({"latest": {"tag": "Latest", "ssm_parameter": "/ami/app/latest"}})
    old = image(days_old=40, name="app-1", tags={"Latest": "true"})
    new = image(days_old=1, name="app-2")
    current = {"parameters": {"/ami/app/latest": old.image_id}}
    for other in ({"state": "failed"}, {"state": "disabled"}):
        arm = image(days_old=0, name="app-2-arm", arch="arm64", **other)  # type: ignore[arg-type]
        result = plan([inventory(old, new, arm, **current)], pol, NOW)
        assert [c.to for c in result.latest] == [new.image_id]
        assert not any("must contain {arch}" in e for e in result.policy_errors)


def test_stage_clock() -> None:
    keepers = [image(days_old=10 + i) for i in range(2)]

    def decide(**img: object) -> Decision:
        target = image(days_old=300, **img)  # type: ignore[arg-type]
        return by_id(plan([inventory(*keepers, target)], policy(), NOW))[target.image_id]

    fresh = decide()
    assert (fresh.action, fresh.stages, fresh.candidate_since) == ("deprecate", ["deprecate"], iso(NOW))
    at = NOW - timedelta(days=3)  # the deprecation time the deprecate stage set
    waiting = decide(ledger=ledger_item(3, {"deprecate": 3}), deprecation_time=at)
    assert (waiting.action, waiting.next_action) == ("wait", "disable")
    assert waiting.next_action_at == iso(NOW + timedelta(days=4))
    deprecated = NOW - timedelta(days=8)
    assert decide(ledger=ledger_item(8, {"deprecate": 8}), deprecation_time=deprecated).action == "disable"
    # An owner's deprecation time long after the stage's record hides nothing: the stage is done again.
    owners = decide(
        ledger=ledger_item(8, {"deprecate": 8}, confirmed=False), deprecation_time=NOW + timedelta(days=90)
    )
    assert (owners.action, owners.stages) == ("deprecate", ["deprecate"])
    # Recorded, but EC2 shows no deprecation time (a crash, a rescue that stopped half way): deprecate
    # again, and the next stage waits its full delay from now.
    half_way = decide(ledger=ledger_item(8, {"deprecate": 8}, confirmed=False))
    assert (half_way.action, half_way.stages) == ("deprecate", ["deprecate"])
    assert half_way.next_action_at == iso(NOW + timedelta(days=7))
    assert "deprecate recorded in the ledger but not done: done again" in half_way.reasons
    # EC2 shows a later stage: the earlier one is settled (a disabled AMI launches no more).
    settled = decide(ledger=ledger_item(30, {"deprecate": 30, "disable": 23}), state="disabled")
    assert "deprecate recorded in the ledger but not done: done again" not in settled.reasons
    # A disable the ledger recorded that EC2 does not show (a rescue that stopped half way, then its keep
    # reason lapsed) is done again once the clock makes it due: now under the policy it was recorded
    # under, but not sooner than the policy's raised days allow.
    undone = {"ledger": ledger_item(8, {"deprecate": 8, "disable": 1}), "deprecation_time": deprecated}
    assert decide(**undone).action == "disable"
    later = {"lifecycle": {"deprecate_after_days": 0, "disable_after_days": 30, "deregister_after_days": 40}}
    target = image(days_old=300, **undone)  # type: ignore[arg-type]
    waits = by_id(plan([inventory(*keepers, target)], policy(defaults=later), NOW))[target.image_id]
    assert (waits.action, waits.next_action) == ("wait", "disable")
    assert waits.next_action_at == iso(NOW + timedelta(days=22))
    # A clock that started long ago, but no stage recorded: the stages still go one after another,
    # each its own delay after the one before (deprecate now, disable 7 days later).
    overdue = decide(ledger=ledger_item(20))
    assert (overdue.action, overdue.stages) == ("deprecate", ["deprecate"])
    assert overdue.next_action_at == iso(NOW + timedelta(days=7))
    disabled = decide(ledger=ledger_item(15, {"deprecate": 15, "disable": 1}), state="disabled")
    assert (disabled.action, disabled.stages) == ("wait", [])
    assert disabled.next_action_at == iso(NOW + timedelta(days=6))
    done = decide(ledger=ledger_item(30, {"deprecate": 30, "disable": 23}), state="disabled")
    assert (done.action, done.stages) == ("deregister", ["deregister"])
    # Janitor tags say nothing: a backdated clock tag on a fresh candidate starts no earlier stage.
    forged = decide(tags={CANDIDATE_TAG: iso(NOW - timedelta(days=400)) or "", PRIOR_DEPRECATION_TAG: "none"})
    assert (forged.action, forged.stages, forged.candidate_since) == ("deprecate", ["deprecate"], iso(NOW))


def test_a_stage_done_again_gives_the_next_its_full_delay_from_then() -> None:
    """Disable recorded 13 days ago, its DisableImage refused (throttled, a crash, a region skipped for
    days), done again yesterday: deregistration (7 days after disable) waits until 6 days from now,
    not at once from the first record. A confirmation written late moves nothing (EC2 took the stage
    when it was recorded)."""
    keepers = [image(days_old=10 + i) for i in range(2)]
    item = ledger_item(20, {"deprecate": 20, "disable": 13}).model_copy(deep=True)
    yesterday = NOW - timedelta(days=1)
    item.stages["disable"] = item.stages["disable"].model_copy(
        update={"confirmed": yesterday, "redone": yesterday}
    )
    target = image(days_old=300, state="disabled", ledger=item, deprecation_time=NOW - timedelta(days=20))
    decision = by_id(plan([inventory(*keepers, target)], policy(), NOW))[target.image_id]
    assert (decision.action, decision.next_action) == ("wait", "deregister")
    assert decision.next_action_at == iso(NOW + timedelta(days=6))
    late = item.model_copy(deep=True)
    late.stages["disable"] = late.stages["disable"].model_copy(update={"redone": None})
    confirmed_late = target.model_copy(update={"ledger": late})
    decision = by_id(plan([inventory(*keepers, confirmed_late)], policy(), NOW))[target.image_id]
    assert (decision.action, decision.stages) == ("deregister", ["deregister"])


def test_all_zero_stages_deregister_at_once_and_null_skips() -> None:
    keepers = [image(days_old=10 + i) for i in range(2)]
    old = image(days_old=300)
    decision = by_id(plan([inventory(*keepers, old)], policy(ALL_ZERO), NOW))[old.image_id]
    assert decision.stages == ["deprecate", "disable", "deregister"]
    skip = policy({"lifecycle": {"deprecate_after_days": None, "disable_after_days": None}})
    decision = by_id(plan([inventory(*keepers, old)], skip, NOW))[old.image_id]
    assert (decision.action, decision.next_action_at) == ("wait", iso(NOW + timedelta(days=14)))


def test_lifecycle_days_edited_mid_clock_count_from_when_the_stages_happened() -> None:
    keepers = [image(days_old=10 + i) for i in range(2)]
    # Deprecated 10 days ago, disabled 3 days ago (disable_after_days: 7).
    clock = {"ledger": ledger_item(10, {"deprecate": 10, "disable": 3}), "state": "disabled"}

    def decide(lifecycle: dict[str, int | None]) -> Decision:
        target = image(days_old=300, **clock)  # type: ignore[arg-type]
        return by_id(plan([inventory(*keepers, target)], policy({"lifecycle": lifecycle}), NOW))[
            target.image_id
        ]

    # Lengthened: the new delay counts from the disable stage as the ledger recorded it.
    longer = decide({"disable_after_days": 7, "deregister_after_days": 30})
    assert (longer.action, longer.next_action_at) == ("wait", iso(NOW + timedelta(days=20)))
    # Shortened below what has elapsed: due once the disabled AMI has waited the new gap (here 1 day).
    shorter = decide({"disable_after_days": 7, "deregister_after_days": 8})
    assert (shorter.action, shorter.stages) == ("deregister", ["deregister"])
    # The disable stage lengthened past the clock: the AMI disabled under the old rules waits the new
    # gap after its disable, never less.
    wider = decide({"disable_after_days": 20, "deregister_after_days": 25})
    assert (wider.action, wider.next_action_at) == ("wait", iso(NOW + timedelta(days=15)))


def test_rescue_when_a_keep_reason_returns() -> None:
    keepers = [image(days_old=10 + i) for i in range(2)]
    back = image(days_old=300, state="disabled", ledger=ledger_item(9, {"deprecate": 9, "disable": 2}))
    inv = inventory(*keepers, back, references=(reference(back.image_id),))
    decision = by_id(plan([inv], policy(), NOW))[back.image_id]
    assert decision.action == "rescue"
    assert decision.reasons == ["used by instance i-1 (stopped)"]
    assert decision.candidate_since == iso(NOW - timedelta(days=9))
    # Janitor tags alone are no clock: nothing to undo, so it is only kept.
    tagged = image(days_old=300, tags={CANDIDATE_TAG: iso(NOW) or ""}, state="disabled")
    inv = inventory(*keepers, tagged, references=(reference(tagged.image_id),))
    assert by_id(plan([inv], policy(), NOW))[tagged.image_id].action == "keep"


def test_caps_fraction_per_group_and_actions_per_region() -> None:
    images = [image(days_old=100 + i) for i in range(10)]
    pol = policy(
        {"keep_latest": 1}, defaults={"limits": {"max_actions_per_run": 100, "max_fraction_per_family": 0.5}}
    )
    result = plan([inventory(*images)], pol, NOW)
    acting = [d for d in result.decisions if d.action == "deprecate"]
    assert len(acting) == 5  # floor(0.5 x 10)
    assert {d.image_id for d in acting} == {i.image_id for i in images[5:]}  # oldest move first
    held = [d for d in result.decisions if any("max_fraction_per_family" in r for r in d.reasons)]
    assert len(held) == 4 and result.summary.held_by_cap == 4
    tight = policy(
        {"keep_latest": 1}, defaults={"limits": {"max_actions_per_run": 3, "max_fraction_per_family": 1}}
    )
    result = plan([inventory(*images)], tight, NOW)
    assert sum(d.action == "deprecate" for d in result.decisions) == 3
    assert any("held back by max_actions_per_run (3)" in d.reasons for d in result.decisions)


def test_encrypted_in_place_copy_stands_in_for_its_original() -> None:
    original = image(days_old=40)
    copy = copied(original.image_id, "us-east-1", original.created, days_old=39)
    older = image(days_old=100)
    pol = policy({"keep_latest": 1, "latest": {"tag": "Latest"}, "min_age_days": 0})
    result = plan([inventory(original, copy, older)], pol, NOW)
    decisions = by_id(result)
    assert decisions[copy.image_id].action == "keep"
    assert decisions[original.image_id].action == "deprecate"
    assert "its encrypted copy in this region stands in for it" in decisions[original.image_id].reasons
    assert result.latest[0].to == copy.image_id


def test_skipped_region_has_no_decisions() -> None:
    pol = policy(regions=["us-east-1", "eu-west-1"])
    broken = inventory(region="eu-west-1", error="launch templates: AccessDenied: no")
    result = plan([inventory(image()), broken], pol, NOW)
    assert [(r.region, r.status) for r in result.regions] == [("eu-west-1", "skipped"), ("us-east-1", "ok")]
    assert {d.region for d in result.decisions} == {"us-east-1"}
    assert result.summary.regions_skipped == 1


def test_unfinished_deregistration_and_recycle_bin_reported() -> None:
    present = image()
    recorded = LedgerSnapshot(snapshot_id="snap-gone", image_id="ami-gone")
    shared = LedgerSnapshot(snapshot_id=present.snapshot_ids[0], image_id="ami-gone")
    gone = ledger_item(30, {"deprecate": 30, "disable": 20, "deregister": 1}, image_id="ami-gone")
    gone = gone.model_copy(update={"snapshots": (recorded, shared)})
    finished = ledger_item(30, {"deregister": 2}, image_id="ami-done").model_copy(
        update={
            "snapshots": (LedgerSnapshot(snapshot_id="snap-done", image_id="ami-done"),),
            "deregistered": NOW,
        }
    )
    ledger = LedgerView(table="t", items={"ami-gone": gone, "ami-done": finished}, adopted=ADOPTED)
    inv = inventory(
        present,
        retired_snapshots=(
            RetiredSnapshot(snapshot_id="snap-gone", image_id="ami-gone"),
            RetiredSnapshot(snapshot_id="snap-forged", image_id="ami-gone"),
        ),
        recycle_bin_rules=("Recycle Bin rule r1 retains EC2_IMAGE for 7 days",),
        ledger=ledger,
    )
    result = plan([inv], policy(), NOW)
    # Only what the ledger recorded for a deregistration it did not confirm, and no AMI still uses.
    assert result.unfinished_snapshots == ["snap-gone"]
    assert (
        "us-east-1: snapshots of an unfinished deregistration the ledger recorded: 1, deleted by this run "
        "where it applies" in result.notes
    )
    assert any("deferred" in note for note in result.notes)
    assert [(t.image_id, t.tag, t.value, t.ledger) for t in result.tampered] == [
        ("snap-forged", "ami-janitor:retired-from", "ami-gone", None)
    ]
    assert result.summary.tampered == 1


def test_snapshot_deletions_count_toward_max_actions_per_run() -> None:
    # Oldest first: two snapshots of its own, then one shared with a kept AMI, then none.
    two = image(days_old=300, snapshots=("snap-a1", "snap-a2"))
    shared = image(days_old=200, snapshots=("snap-shared",))
    none = image(days_old=150, snapshots=())
    kept = image(days_old=1, snapshots=("snap-shared",))
    limits = {"max_actions_per_run": 3, "max_fraction_per_family": 1}
    pol = policy({"keep_latest": 1, **ALL_ZERO}, defaults={"limits": limits})
    decisions = by_id(plan([inventory(two, shared, none, kept)], pol, NOW))
    # two: 1 + 2 snapshots = 3 actions, the whole budget; the shared snapshot is not deleted, so
    # `shared` would cost 1, but nothing is left.
    assert decisions[two.image_id].action == "deregister"
    assert decisions[shared.image_id].action == "keep"
    assert "held back by max_actions_per_run (3)" in decisions[shared.image_id].reasons
    assert decisions[none.image_id].action == "keep"
    tight = policy({"keep_latest": 1, **ALL_ZERO}, defaults={"limits": {**limits, "max_actions_per_run": 2}})
    decisions = by_id(plan([inventory(two, shared, none, kept)], tight, NOW))
    held = decisions[two.image_id]
    assert held.action == "keep" and held.next_action == "deprecate"
    assert held.reasons[-1] == (
        "held back by max_actions_per_run (2): deregistering it would delete 2 snapshot(s), 3 actions"
    )
    # The younger ones fit: one action each (the shared snapshot stays with `kept`).
    assert decisions[shared.image_id].action == "deregister"
    assert decisions[none.image_id].action == "deregister"


def test_a_snapshot_two_deregistrations_share_is_paid_for_by_the_second() -> None:
    """Both AMIs go this run: the first leaves the snapshot to the second, whose deregistration
    deletes it (the executor counts the first as gone), so the second costs 2 actions."""
    first = image(days_old=300, snapshots=("snap-both",))
    second = image(days_old=200, snapshots=("snap-both",))
    kept = image(days_old=1)
    limits = {"max_actions_per_run": 2, "max_fraction_per_family": 1}
    pol = policy({"keep_latest": 1, **ALL_ZERO}, defaults={"limits": limits})
    decisions = by_id(plan([inventory(first, second, kept)], pol, NOW))
    assert decisions[first.image_id].action == "deregister"
    assert decisions[second.image_id].action == "keep"
    assert decisions[second.image_id].reasons[-1] == (
        "held back by max_actions_per_run (2): deregistering it would delete 1 snapshot(s), 2 actions"
    )
    roomy = policy({"keep_latest": 1, **ALL_ZERO}, defaults={"limits": {**limits, "max_actions_per_run": 3}})
    decisions = by_id(plan([inventory(first, second, kept)], roomy, NOW))
    assert [decisions[i.image_id].action for i in (first, second)] == ["deregister", "deregister"]


def test_summary_counts_only_snapshots_no_remaining_ami_uses() -> None:
    keepers = [image(days_old=10, snapshots=("snap-shared",)), image(days_old=11)]
    old = image(days_old=300, snapshots=("snap-shared", "snap-own"), size_gib=20)
    result = plan([inventory(*keepers, old)], policy(ALL_ZERO), NOW)
    assert (result.summary.retired, result.summary.snapshots_deleted, result.summary.gib_freed_max) == (
        1,
        1,
        20,
    )


def test_instance_store_deregistration_says_the_bundle_stays() -> None:
    keepers = [image(days_old=10 + i) for i in range(2)]
    legacy = image(days_old=300, root_device_type="instance-store", snapshots=())
    decision = by_id(plan([inventory(*keepers, legacy)], policy(ALL_ZERO), NOW))[legacy.image_id]
    assert any("S3 bundle" in r for r in decision.reasons)


def test_pending_and_failed_are_kept() -> None:
    pending = image(days_old=300, state="pending")
    failed = image(days_old=301, state="failed")
    decisions = by_id(plan([inventory(pending, failed)], policy(), NOW))
    assert decisions[pending.image_id].action == "keep" and decisions[failed.image_id].action == "keep"


def test_same_inputs_same_bytes_in_any_order() -> None:
    images = [image(days_old=d, arch=random.choice(["x86_64", "arm64"])) for d in range(5, 200, 7)]
    pol = policy({"latest": {"tag": "Latest", "ssm_parameter": "/a/{arch}"}})
    first = plan([inventory(*images)], pol, NOW).to_json()
    shuffled = images[:]
    random.Random(4).shuffle(shuffled)
    assert plan([inventory(*shuffled)], pol, NOW).to_json() == first


def test_plan_json_has_the_documented_shape() -> None:
    data = plan([inventory(image())], policy(), NOW).to_dict()
    assert list(data)[:9] == [
        "mode",
        "generated_at",
        "regions",
        "decisions",
        "latest",
        "copies",
        "shares",
        "bakes",
        "summary",
    ]
    decision_keys = {
        "region",
        "family",
        "architecture",
        "image_id",
        "name",
        "created",
        "action",
        "reasons",
        "candidate_since",
        "next_action",
        "next_action_at",
        "snapshots",
        "size_gib",
        "source_image_id",
    }
    assert decision_keys <= set(data["decisions"][0])
    assert {"images", "kept", "retired", "snapshots_deleted", "gib_freed_max"} <= set(data["summary"])


def build_instance(instance_id: str, state: str = "stopped", role: str = "build") -> BuildInstance:
    return BuildInstance(instance_id=instance_id, state=state, tags={"Role": role})


SCHEDULED_BAKE = {"instance_tag": {"Role": "build"}, "schedule": "cron(0 2 * * ? *)"}


def test_the_plan_names_the_instance_each_scheduled_bake_will_image() -> None:
    builder = build_instance("i-0b0b0b0b")
    pol = policy({"bake": SCHEDULED_BAKE})

    result = plan(
        [inventory(image(), build_instances=(builder, build_instance("i-0c0c", "shutting-down")))], pol, NOW
    )

    assert result.bakes == [
        ScheduledBake(
            region="us-east-1",
            family="app",
            instance_id="i-0b0b0b0b",
            reason="the only instance tagged Role=build",
        )
    ]
    pinned = policy({"bake": {**SCHEDULED_BAKE, "instance_id": "i-0b0b0b0b"}})
    [bake] = plan([inventory(build_instances=(builder,))], pinned, NOW).bakes
    assert (bake.instance_id, bake.reason, bake.refusal) == ("i-0b0b0b0b", "pinned by bake.instance_id", None)


def test_the_plan_says_why_a_scheduled_bake_would_refuse() -> None:
    pol = policy({"bake": SCHEDULED_BAKE})
    several = (build_instance("i-0b0b0b0b"), build_instance("i-0a0a", "running"))

    [bake] = plan([inventory(build_instances=several)], pol, NOW).bakes

    assert bake.instance_id is None and bake.reason is None
    assert bake.refusal is not None and "i-0a0a (running), i-0b0b0b0b (stopped)" in bake.refusal
    [bake] = plan([inventory()], pol, NOW).bakes
    assert bake.refusal == (
        "family app: no running or stopped instance in us-east-1 carries the tags Role=build (bake.instance_tag)"
    )


def test_only_scheduled_bakes_of_readable_policy_regions_are_planned() -> None:
    builder = (build_instance("i-0b0b0b0b"),)
    unscheduled = policy({"bake": {"instance_tag": {"Role": "build"}}})
    assert plan([inventory(build_instances=builder)], unscheduled, NOW).bakes == []
    # Replication targets get no bake rule; a skipped region's instances are unknown.
    pol = policy({"bake": SCHEDULED_BAKE, "replicate": [{"region": "eu-west-1"}]})
    target = inventory(build_instances=builder, region="eu-west-1")
    assert plan([target], pol, NOW).bakes == []
    skipped = inventory(region="us-east-1", error="ec2:DescribeInstances: Throttling: slow down")
    assert plan([skipped], pol, NOW).bakes == []


def test_a_scheduled_bake_is_planned_only_in_its_bake_regions() -> None:
    builder = (build_instance("i-0b0b0b0b"),)
    pol = policy(
        {"bake": {**SCHEDULED_BAKE, "instance_id": "i-0b0b0b0b", "regions": ["eu-west-1"]}},
        regions=["us-east-1", "eu-west-1"],
    )
    assert plan([inventory(build_instances=builder, region="us-east-1")], pol, NOW).bakes == []
    [bake] = plan([inventory(build_instances=builder, region="eu-west-1")], pol, NOW).bakes
    assert (bake.region, bake.instance_id) == ("eu-west-1", "i-0b0b0b0b")


def test_an_ami_left_by_the_policy_mid_retirement_is_named_in_a_note() -> None:
    """A family removed or its match narrowed: the janitor neither retires such an AMI further nor
    rescues it, and says so, so that a disabled one does not stay disabled unseen."""
    left = image(
        days_old=300,
        tags={"Project": "Gone"},
        state="disabled",
        ledger=ledger_item(9, {"deprecate": 9, "disable": 2}),
    )
    clock_only = image(days_old=300, tags={"Project": "Gone"}, ledger=ledger_item(1))
    member = image(days_old=300, state="disabled", ledger=ledger_item(9, {"deprecate": 9, "disable": 2}))

    result = plan(
        [inventory(image(days_old=10), image(days_old=11), left, clock_only, member)], policy(), NOW
    )

    assert [n for n in result.notes if "no family" in n] == [
        f"us-east-1: in no family of the policy, with stages the janitor applied and no longer follows (left "
        f"as they are; `ami-janitor rescue AMI_ID` undoes them): {left.image_id}"
    ]
    assert left.image_id not in by_id(result)


def test_a_rescue_that_leaves_a_one_parameter_family_unrotated_keeps_its_latest_holder() -> None:
    """One parameter for every architecture. A newer x86_64 build would take Latest from `holder`, but
    the arm64 group's only AMI, disabled by the janitor and in use again, is rescued: two architectures
    then have an AMI Latest could name, so the family is not rotated and Latest stays on `holder`. It
    was judged as if Latest had left it, and deprecated."""
    pol = policy(
        {"latest": {"tag": "Latest", "ssm_parameter": "/ami/app/latest"}},
        defaults={"keep_latest": 1},
    )
    holder = image(days_old=100, name="app-x86-1", tags={"Latest": "true"})
    newer = image(days_old=40, name="app-x86-2")
    arm = image(
        days_old=90,
        name="app-arm",
        arch="arm64",
        state="disabled",
        ledger=ledger_item(24, {"deprecate": 20, "disable": 10}),
    )
    inv = inventory(
        holder,
        newer,
        arm,
        references=(reference(arm.image_id),),
        parameters={"/ami/app/latest": holder.image_id},
    )

    result = plan([inv], pol, NOW)

    decisions = by_id(result)
    assert decisions[arm.image_id].action == "rescue"
    assert [c for c in result.latest if c.family == "app"] == []
    assert decisions[holder.image_id].action == "keep", decisions[holder.image_id].reasons
