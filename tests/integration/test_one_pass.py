"""A scheduled run reads each region once: one inventory, one plan, the launch permissions it asks for."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

import yaml
from botocore.awsrequest import AWSResponse

from ami_janitor import engine
from ami_janitor.aws.clients import ClientFactory, RegionClients
from ami_janitor.aws.inventory import count_calls, load_inventory
from ami_janitor.aws.ledger import Ledger, Prior
from ami_janitor.core import run_plan
from ami_janitor.core.policy import DEFAULT_LEDGER_TABLE, parse_policy
from server import POLICY, ec2, make_ledger, now, seed_fleet
from sessions import botocore_session


def test_an_applied_run_reads_each_region_once(endpoint: str) -> None:
    fleet = seed_fleet(now())
    make_ledger()
    # One AMI the janitor had disabled (as its ledger records), now in use again: the run rescues it
    # and rotates Latest after.
    rescued = fleet.images[1]
    client = ec2()
    client.run_instances(ImageId=rescued, MinCount=1, MaxCount=1)
    book = Ledger(RegionClients("us-east-1"), DEFAULT_LEDGER_TABLE)
    since = now() - timedelta(days=30)
    assert book.record_candidate(rescued, since) == "recorded"
    for stage in ("deprecate", "disable"):
        assert book.record_stage(rescued, stage, since, Prior()) == "recorded"
        book.confirm_stage(rescued, stage, since)
    client.disable_image(ImageId=rescued)
    policy = parse_policy(yaml.safe_load(POLICY.format(mode="enforce")))
    factory = ClientFactory()
    clients = factory("us-east-1")
    calls = count_calls(clients.ec2, clients.ssm)

    result = engine.run(policy, ["us-east-1"], factory, now(), apply=True)

    assert result.exit_code == 0, result.results
    actions = {d.image_id: d.action for d in result.plan.decisions}
    assert actions[rescued] == "rescue"
    assert client.describe_images(ImageIds=[rescued])["Images"][0]["State"] == "available"
    # Inventory once; no second read for shares or copies. The Latest changes are written after the
    # region's AMIs are read once more (the event function may have rotated since the plan's read), and
    # the groups written are read once again after (an event may have rotated during the writes).
    # The due stages' one slice reads its own AMIs again: by id, and the AMIs that share their snapshots.
    assert result.slices_queued == 0
    assert result.plan.latest and all(r.status == "ok" for r in result.rotations), result.rotations
    assert calls["ec2:DescribeImages"] == 1 + 1 + 1 + 2, calls
    # Launch permissions only for the AMIs the plan retires, one call each; the slice reads them again
    # just before a disable stage records them (they may have changed since the plan).
    retiring = [d for d in result.plan.decisions if d.action in ("deprecate", "disable", "deregister")]
    disabling = [d for d in retiring if "disable" in d.stages or d.action == "disable"]
    assert retiring and calls["ec2:DescribeImageAttribute"] == len(retiring) + len(disabling), calls
    # The reference sources: once for the plan, once more by the slice, as moto (like some partitions)
    # offers no DescribeImageReferences for it to ask instead.
    assert calls["ec2:DescribeLaunchTemplates"] == 2 and calls["ssm:DescribeParameters"] == 2


def test_per_ami_reads_follow_the_work_a_cap_lets_through(moto_aws: None) -> None:
    """1,000 AMIs, a cap of 100: launch permissions and DescribeImageReferences are asked only about the
    AMIs the cap lets act, and one of them, referenced only by an Image Builder recipe that
    DescribeImageReferences alone sees, is kept (the run then acts on 99: the cap is not spent again)."""
    import boto3

    client = boto3.client("ec2", region_name="us-east-1")
    ids = [client.register_image(Name=f"app-{n:04d}")["ImageId"] for n in range(1000)]
    recipe = "arn:aws:imagebuilder:us-east-1:123456789012:image-recipe/app/1.0.0"
    policy = parse_policy(
        {
            "regions": ["us-east-1"],
            "defaults": {
                "keep_latest": 1,
                "min_age_days": 0,
                "lifecycle": {"deprecate_after_days": 0},
                "limits": {"max_actions_per_run": 100, "max_fraction_per_family": 1.0},
            },
            "families": [{"name": "app", "match": {"name": "app-*"}}],
        }
    )
    factory = ClientFactory()
    clients = factory("us-east-1")
    asked: list[list[str]] = []
    recipe_user: list[str] = []

    def ask(params: dict[str, Any], **_: Any) -> None:
        asked.append(list(params["ImageIds"]))

    def answer(**_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        # moto lacks the call: answered here as EC2 would, before any request is sent.
        batch = asked[-1]
        if not recipe_user:
            recipe_user.append(batch[0])
        found = [
            {"ImageId": i, "ResourceType": "imagebuilder:ImageRecipe", "Arn": recipe}
            for i in batch
            if i in recipe_user
        ]
        return AWSResponse("", 200, {}, None), {"ImageReferences": found}

    events = clients.ec2.meta.events
    events.register("before-parameter-build.ec2.DescribeImageReferences", ask)
    events.register("before-call.ec2.DescribeImageReferences", answer)
    calls = count_calls(clients.ec2, clients.ssm)

    plan, _ = engine.build_plan(policy, ["us-east-1"], factory, now())

    assert plan.regions[0].status == "ok", plan.regions
    acting = [d for d in plan.decisions if d.action == "deprecate"]
    held = [d for d in plan.decisions if d.reasons[-1].startswith("held back by max_actions_per_run")]
    assert len(plan.decisions) == 1000 and len(acting) == 99 and len(held) == 899
    kept = next(d for d in plan.decisions if d.image_id == recipe_user[0])
    assert kept.action == "keep"
    assert kept.reasons == [f"referenced by imagebuilder:ImageRecipe {recipe} (DescribeImageReferences)"]
    # Asked about the 100 the cap let through, 10 ids a call; launch permissions of those 100 only.
    assert sum(len(batch) for batch in asked) == 100 and max(len(batch) for batch in asked) == 10
    assert calls["ec2:DescribeImageReferences"] == 10, calls
    assert calls["ec2:DescribeImageAttribute"] == 100, calls
    assert {i for batch in asked for i in batch} == {d.image_id for d in [*acting, kept]}
    assert set(ids) == {d.image_id for d in plan.decisions}


def test_a_region_without_a_family_ami_makes_no_client_for_the_reference_sources(moto_aws: None) -> None:
    """Where no AMI matches a family the plan decides nothing: no reference can keep an AMI and no
    Latest moves, so the run reads the AMIs, the retired snapshots, Recycle Bin, image block public
    access and the ledger, and makes no client for SSM, Auto Scaling, Batch or EMR. One AMI of the
    family, and every source is read as before."""
    import boto3

    policy = parse_policy(
        {
            "mode": "enforce",
            "regions": ["us-east-1"],
            "families": [
                {"name": "app", "match": {"name": "app-*"}, "latest": {"ssm_parameter": "/ami/app"}}
            ],
        }
    )
    client = boto3.client("ec2", region_name="us-east-1")
    other = client.register_image(Name="other-1")["ImageId"]
    make_ledger()

    def run() -> tuple[engine.RunResult, set[str], Counter[str]]:
        session = botocore_session("us-east-1")
        made: set[str] = set()

        def record(event_name: str, **_: Any) -> None:
            made.add(event_name.removeprefix("creating-client-class."))

        session.register("creating-client-class", record)
        factory = ClientFactory(session)
        clients = factory("us-east-1")
        calls = count_calls(clients.ec2, clients.dynamodb)
        return engine.run(policy, ["us-east-1"], factory, now(), apply=True), made, calls

    result, made, calls = run()

    assert result.exit_code == 0 and result.plan.regions[0].status == "ok"
    assert result.plan.decisions == [] and result.plan.latest == []
    assert [i["ImageId"] for i in client.describe_images(Owners=["self"])["Images"]] == [other]
    assert made == {"ec2", "dynamodb", "rbin"}
    # The ledger's Scan says the table is there: an applying run asks no DescribeTable first. The
    # first enforce run with a ledger records that it adopted the older janitor tags (UpdateItem).
    assert set(calls) == {
        "dynamodb:Scan",
        "dynamodb:UpdateItem",
        "ec2:DescribeImages",
        "ec2:DescribeSnapshots",
        "ec2:GetImageBlockPublicAccessState",
    }

    app = client.register_image(Name="app-1")["ImageId"]
    result, made, calls = run()

    assert result.exit_code == 0 and [d.image_id for d in result.plan.decisions] == [app]
    assert {"ssm", "auto-scaling", "batch", "emr"} <= made
    assert calls["ec2:DescribeInstances"] == 1 and calls["ec2:DescribeLaunchTemplates"] == 1


def test_a_region_whose_details_fail_leaves_the_others_settled_not_planned_again(moto_aws: None) -> None:
    """us-east-1's launch permissions cannot be read: it is skipped. eu-west-1's plan is the one its
    details settled: the AMI the cap let through is kept (shared outside share_with), and the cap is not
    spent again on the next candidate, whose details were never read."""
    import boto3

    policy = parse_policy(
        {
            "regions": ["us-east-1", "eu-west-1"],
            "defaults": {
                "keep_latest": 1,
                "min_age_days": 0,
                "lifecycle": {"deprecate_after_days": 0},
                "limits": {"max_actions_per_run": 1, "max_fraction_per_family": 1.0},
            },
            "families": [{"name": "app", "match": {"name": "app-*"}}],
        }
    )
    for region in ("us-east-1", "eu-west-1"):
        client = boto3.client("ec2", region_name=region)
        for n in range(3):
            client.register_image(Name=f"app-{n}")
    factory = ClientFactory()
    asked: dict[str, list[str]] = {}
    for region in ("us-east-1", "eu-west-1"):
        events = factory(region).ec2.meta.events

        def no_references(**_: Any) -> tuple[AWSResponse, dict[str, Any]]:
            return AWSResponse("", 200, {}, None), {"ImageReferences": []}  # moto lacks the call

        def permissions(params: dict[str, Any], region: str = region, **_: Any) -> None:
            asked.setdefault(region, []).append(params["ImageId"])

        events.register("before-call.ec2.DescribeImageReferences", no_references)
        events.register("before-parameter-build.ec2.DescribeImageAttribute", permissions)

    def denied(**_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        return AWSResponse("", 403, {}, None), {"Error": {"Code": "UnauthorizedOperation", "Message": "no"}}

    factory("us-east-1").ec2.meta.events.register("before-call.ec2.DescribeImageAttribute", denied)
    # The candidate the cap lets act in eu-west-1 is shared with an account share_with does not list.
    draft = run_plan.plan_run([load_inventory(factory("eu-west-1"), policy)], policy, now())
    [through] = [d.image_id for d in draft.decisions if d.action == "deprecate"]
    boto3.client("ec2", region_name="eu-west-1").modify_image_attribute(
        ImageId=through, LaunchPermission={"Add": [{"UserId": "999988887777"}]}
    )

    plan, _ = engine.build_plan(policy, ["us-east-1", "eu-west-1"], factory, now())

    statuses = {r.region: r.status for r in plan.regions}
    assert statuses == {"us-east-1": "skipped", "eu-west-1": "ok"}, plan.regions
    decisions = {d.image_id: d for d in plan.decisions if d.region == "eu-west-1"}
    assert decisions[through].action == "keep"
    assert decisions[through].reasons == ["shared with user:999988887777 (not in share_with)"]
    # Nothing else acts in eu-west-1: the only launch permissions read there were those of `through`.
    assert [d.action for d in decisions.values()].count("deprecate") == 0, decisions
    assert asked["eu-west-1"] == [through]
