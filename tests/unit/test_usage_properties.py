"""Safety of usage reports: a shared AMI retires only when every account it is shared with has a
fresh, readable report that does not name it (or, with `required: false`, sent none); a share to an
organization or OU whose accounts cannot be listed keeps it. Checked through the plan as the run
settles it, and through a slice's fresh read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from ami_janitor.core import run_plan
from ami_janitor.core.model import LaunchPermission, ReceivedReport, RegionInventory, UsageView
from ami_janitor.core.policy import Policy, parse_policy
from ami_janitor.core.slices import SliceItem, share_hold
from ami_janitor.core.usage import account_reason
from builders import image

NOW = datetime(2026, 11, 25, 3, tzinfo=UTC)
REGION = "us-east-1"
OWNER = "123456789012"
ACCOUNTS = ("111111111111", "222222222222", "333333333333")
OU = "arn:aws:organizations::123456789012:ou/o-abcdefghij/ou-abcd-11111111"
MAX_AGE = 48


def policy(required: bool) -> Policy:
    return parse_policy(
        {
            "mode": "enforce",
            "regions": [REGION],
            "defaults": {
                "keep_latest": 1,
                "min_age_days": 0,
                "lifecycle": {"deprecate_after_days": 0, "disable_after_days": 0, "deregister_after_days": 0},
                "limits": {"max_actions_per_run": 100, "max_fraction_per_family": 1.0},
            },
            "families": [
                {
                    "name": "app",
                    "match": {"name": "app-*"},
                    "share_with": {"accounts": list(ACCOUNTS), "organizational_units": [OU]},
                }
            ],
            "usage_reports": {"inbox": "s3://inbox", "max_age_hours": MAX_AGE, "required": required},
        }
    )


# Each account's report: none, unreadable, stale, fresh naming the AMI, fresh not naming it.
REPORT_KINDS = st.sampled_from(["none", "unreadable", "stale", "uses-it", "unused"])


def received(account: str, kind: str, image_id: str) -> ReceivedReport | None:
    if kind == "none":
        return None
    at = NOW - timedelta(hours=MAX_AGE + 1 if kind == "stale" else 1)
    uses = (
        {image_id: ("referenced by launch template lt-1",)} if kind == "uses-it" else {"ami-0other": ("x",)}
    )
    problem = "not valid JSON" if kind == "unreadable" else None
    return ReceivedReport(account=account, received_at=at, uses=uses, problem=problem)


@st.composite
def situations(draw: st.DrawFn) -> dict[str, object]:
    shared_with = draw(st.lists(st.sampled_from(ACCOUNTS), unique=True, max_size=3))
    via_ou = draw(st.booleans())
    ou_members = draw(st.none() | st.lists(st.sampled_from(ACCOUNTS), unique=True, max_size=3))
    kinds = {account: draw(REPORT_KINDS) for account in ACCOUNTS}
    return {
        "shared_with": shared_with,
        "via_ou": via_ou,
        "ou_members": ou_members,
        "kinds": kinds,
        "required": draw(st.booleans()),
    }


def consumers_and_safe(situation: dict[str, object]) -> tuple[set[str], bool]:
    """The accounts a share reaches, and whether every one of them has said, freshly, it is unused."""
    shared_with = set(situation["shared_with"])  # type: ignore[call-overload]
    members = situation["ou_members"]
    known = True
    if situation["via_ou"]:
        if members is None:
            known = False
        else:
            shared_with |= set(members)  # type: ignore[call-overload]
    kinds: dict[str, str] = situation["kinds"]  # type: ignore[assignment]
    allowed = {"unused"} | ({"none"} if not situation["required"] else set())
    return shared_with, known and all(kinds[a] in allowed for a in shared_with)


@given(situations())
def test_a_shared_ami_retires_only_on_every_consumers_fresh_word(situation: dict[str, object]) -> None:
    old = image(image_id="ami-00000000000000001", name="app-1", days_old=40)
    new = image(image_id="ami-00000000000000002", name="app-2", days_old=1)
    grants = [LaunchPermission(kind="user", value=a) for a in situation["shared_with"]]  # type: ignore[attr-defined]
    if situation["via_ou"]:
        grants.append(LaunchPermission(kind="ou", value=OU))
    old = old.model_copy(update={"launch_permissions": tuple(grants)})
    kinds: dict[str, str] = situation["kinds"]  # type: ignore[assignment]
    reports = {a: r for a in ACCOUNTS if (r := received(a, kinds[a], old.image_id)) is not None}
    members = situation["ou_members"]
    view = UsageView(
        own_account=OWNER,
        reports=reports,
        expansions={f"ou:{OU}": tuple(members) if members is not None else None},  # type: ignore[arg-type]
    )
    inventory = RegionInventory(region=REGION, images=(old, new), usage=view)
    rules = policy(bool(situation["required"]))

    first = run_plan.plan_run([inventory], rules, NOW)
    settled = run_plan.settle(first, {REGION: inventory}, rules)

    decision = next(d for d in settled.decisions if d.image_id == old.image_id)
    consumers, safe = consumers_and_safe(situation)
    if safe:
        assert decision.action == "deregister", decision.reasons
    else:
        assert decision.action == "keep"
        assert any(("account " in r or "ou:" in r) for r in decision.reasons), decision.reasons
    for account in consumers:
        if kinds[account] == "uses-it":
            assert any(
                r.startswith(f"used in account {account} by launch template lt-1") for r in decision.reasons
            )


@given(
    consumers=st.lists(st.sampled_from(ACCOUNTS), unique=True, min_size=1, max_size=3),
    kinds=st.fixed_dictionaries({a: REPORT_KINDS for a in ACCOUNTS}),
    required=st.booleans(),
)
def test_a_slice_acts_on_a_shared_ami_only_on_every_consumers_fresh_word(
    consumers: list[str], kinds: dict[str, str], required: bool
) -> None:
    item = SliceItem(
        image_id="ami-00000000000000001", family="app", stages=("disable",), consumers=tuple(consumers)
    )
    settings = policy(required).usage_reports
    assert settings is not None
    reasons = [
        account_reason(item.image_id, REGION, a, received(a, kinds[a], item.image_id), settings, NOW)
        for a in item.consumers
    ]
    allowed = {"unused"} | ({"none"} if not required else set())
    assert all(r is None for r in reasons) == all(kinds[a] in allowed for a in consumers)


OU_2 = "arn:aws:organizations::123456789012:ou/o-abcdefghij/ou-abcd-22222222"


@given(
    now_shared=st.lists(
        st.sampled_from([*(f"user:{a}" for a in ACCOUNTS), f"ou:{OU}", f"ou:{OU_2}"]), unique=True
    ),
    consumers=st.lists(st.sampled_from(ACCOUNTS), unique=True),
    expanded=st.lists(st.sampled_from([f"ou:{OU}", f"ou:{OU_2}"]), unique=True),
)
def test_a_slice_acts_only_on_the_shares_its_plan_read_the_reports_of(
    now_shared: list[str], consumers: list[str], expanded: list[str]
) -> None:
    """The AMI as the slice reads it is shared with `now_shared` (share_with lists every one, and the
    family allows shares besides: only the reports count). Its item names the accounts whose reports
    the plan read and the OUs it expanded: any other grant was made since the plan, and holds the AMI."""
    allowing = policy(True)
    allowing = parse_policy(
        {
            **allowing.model_dump(mode="json", by_alias=True, exclude_none=True),
            "defaults": {"allow_shared": True},
        }
    )
    shared = image(name="app-1", perms=tuple(now_shared))
    item = SliceItem(
        image_id=shared.image_id,
        family="app",
        stages=("disable",),
        consumers=tuple(sorted(consumers)),
        grants=tuple(sorted(expanded)),
    )

    held = share_hold(item, shared, allowing)

    read = {f"user:{a}" for a in consumers} | set(expanded)
    unread = sorted(set(now_shared) - read)
    assert (held is None) == (not unread), (held, unread)
    for grant in unread:
        assert held is not None and f"shared with {grant}, whose usage report the plan did not read" in held
