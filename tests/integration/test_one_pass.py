"""A scheduled run reads each region once: one inventory, one plan, the launch permissions it asks for."""

from __future__ import annotations

import yaml

from ami_janitor import engine
from ami_janitor.aws.clients import ClientFactory
from ami_janitor.aws.inventory import count_calls
from ami_janitor.core.policy import CANDIDATE_TAG, PRIOR_DEPRECATION_TAG, parse_policy
from server import POLICY, ec2, make_ledger, now, seed_fleet


def test_an_applied_run_reads_each_region_once(endpoint: str) -> None:
    fleet = seed_fleet(now())
    make_ledger()
    # One AMI the janitor had disabled, now in use again: the run rescues it and rotates Latest after.
    rescued = fleet.images[1]
    client = ec2()
    client.run_instances(ImageId=rescued, MinCount=1, MaxCount=1)
    client.create_tags(
        Resources=[rescued],
        Tags=[
            {"Key": CANDIDATE_TAG, "Value": "2026-01-01T00:00:00Z"},
            {"Key": PRIOR_DEPRECATION_TAG, "Value": "none"},
        ],
    )
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
    # Inventory once; no second read for shares, copies or a rotation after the rescues.
    assert calls["ec2:DescribeImages"] == 1, calls
    # Launch permissions only for the AMIs the plan retires, one call each.
    retiring = [d for d in result.plan.decisions if d.action in ("deprecate", "disable", "deregister")]
    assert retiring and calls["ec2:DescribeImageAttribute"] == len(retiring), calls
    assert calls["ec2:DescribeLaunchTemplates"] == 1 and calls["ssm:DescribeParameters"] == 1
