"""Benchmarks (`make bench`): figures printed, nothing asserted.

1. plan() alone on synthetic groups of 10,000 and 50,000 AMIs (references, shares, snapshots in
   realistic proportions), and parsing the DescribeImages answers separately;
2. API calls to inventory one region (moto, in-process), per operation, against the lower bound
   (the sum over sources of ceil(items / page size));
3. the cleanup handler's cold start in a fresh interpreter: its import alone, then its import and first
   invocation on an empty region (`ami-janitor emulator --empty` in another process), against the
   libraries' import and the floor (the libraries, a session, an EC2 client and one call); and what
   the Lambda asset's bytecode saves the runtime (`bytecode`);
4. validating a policy of 100,000 families;
5. `ami-janitor plan` as a user runs it against `ami-janitor emulator` (the demo's account), process
   start included;
6. the fleet simulator (bench/fleet.py): 50,000 AMIs, 10,000 due deregistrations through the slices,
   on the in-memory EC2 with the account's token buckets and a simulated clock;
7. the organization simulator (bench/org.py): an owner and 99 consumer accounts, their daily runs with
   usage reports through the inbox, each account-region on its own token buckets (`python bench/org.py
   17` runs all 17 regions, not a sample).

`python bench/bench.py fleet plan` runs only the sections named (plan, inventory, policy, cold-start,
bytecode, cli, fleet, org).
"""

from __future__ import annotations

import atexit
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")

from ami_janitor.core.model import Image, LaunchPermission, Reference, RegionInventory
from ami_janitor.core.planner import plan
from ami_janitor.core.policy import CANDIDATE_TAG, parse_policy

NOW = datetime(2026, 11, 25, 3, tzinfo=UTC)


def verdict(met: bool) -> str:
    return "PASS" if met else "MISS"


def raw_images(count: int, rng: random.Random) -> list[dict[str, Any]]:
    images = []
    for n in range(count):
        created = NOW - timedelta(days=rng.uniform(0, 720))
        tags = [{"Key": "Project", "Value": "App"}, {"Key": "Version", "Value": str(n)}]
        if rng.random() < 0.3:
            tags.append(
                {"Key": CANDIDATE_TAG, "Value": (created + timedelta(days=60)).strftime("%Y-%m-%dT%H:%M:%SZ")}
            )
        images.append(
            {
                "ImageId": f"ami-{n:017x}",
                "Name": f"app-{n}",
                "Architecture": "arm64" if n % 3 == 0 else "x86_64",
                "State": "available",
                "CreationDate": created.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                "Tags": tags,
                "RootDeviceType": "ebs",
                "Public": False,
                "BlockDeviceMappings": [
                    {"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": f"snap-{n:017x}", "VolumeSize": 8}}
                ],
            }
        )
    return images


def bench_plan() -> None:
    policy = parse_policy(
        {
            "regions": ["us-east-1"],
            "defaults": {"keep_latest": 5, "limits": {"max_actions_per_run": 1000}},
            "families": [
                {
                    "name": "app",
                    "match": {"tags": {"Project": "App"}, "name": "app-*"},
                    "latest": {"tag": "Latest", "ssm_parameter": "/ami/app/{arch}/latest"},
                    "share_with": {"accounts": ["123456789012"]},
                }
            ],
        }
    )
    print("plan() on one core (inventory already parsed):")
    for count in (10_000, 50_000):
        rng = random.Random(count)
        raws = raw_images(count, rng)
        # Both timed the same way: the median of 5 (one parse alone moved the ratio by a tenth).
        parses = []
        for _ in range(5):
            start = time.perf_counter()
            images = [Image.from_api("us-east-1", raw) for raw in raws]
            parses.append(time.perf_counter() - start)
        parse_s = statistics.median(parses)
        # 5% referenced, 2% shared outside share_with, 10% shared with a listed account.
        images = [
            img.model_copy(
                update={
                    "launch_permissions": (LaunchPermission(kind="user", value="999988887777"),)
                    if i % 50 == 0
                    else (LaunchPermission(kind="user", value="123456789012"),)
                    if i % 10 == 0
                    else ()
                }
            )
            for i, img in enumerate(images)
        ]
        refs = tuple(
            Reference(
                image_id=images[i].image_id,
                kind="instance",
                resource_id=f"i-{i}",
                detail=f"used by instance i-{i}",
            )
            for i in range(0, count, 20)
        )
        inventory = RegionInventory(region="us-east-1", images=tuple(images), references=refs)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            result = plan([inventory], policy, NOW)
            times.append(time.perf_counter() - start)
        actions: dict[str, int] = {}
        for d in result.decisions:
            actions[d.action] = actions.get(d.action, 0) + 1
        took = statistics.median(times)
        print(
            f"  {count:>6} AMIs: plan {took:.3f} s, parse DescribeImages answers {parse_s:.3f} s (medians of 5):"
            f" ratio {took / parse_s:.2f} (target <= 1.00) {verdict(took <= parse_s)}  actions {actions}"
        )


def bench_inventory_calls() -> None:
    import boto3
    from moto import mock_aws

    from ami_janitor.aws.clients import RegionClients
    from ami_janitor.aws.inventory import count_calls, load_inventory
    from ami_janitor.demo import emulator

    policy = parse_policy(
        {
            "regions": ["us-east-1"],
            "references": {"launch_template_versions": "all"},
            "families": [
                {"name": "app", "match": {"name": "app-*"}, "latest": {"ssm_parameter": "/ami/app/{arch}"}}
            ],
        }
    )
    counts = {
        "images": 300,
        "instances": 40,
        "launch_templates": 12,
        "versions_per_template": 3,
        "parameters": 60,
    }
    emulator.install()  # what moto lacks is answered as AWS answers an operation it does not offer
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="us-east-1")
        ssm = boto3.client("ssm", region_name="us-east-1")
        base = ec2.register_image(Name="base")["ImageId"]
        instance = ec2.run_instances(ImageId=base, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
        ids = [
            ec2.create_image(InstanceId=instance, Name=f"app-{n}")["ImageId"]
            for n in range(counts["images"] - 1)
        ]
        ec2.run_instances(ImageId=ids[0], MinCount=counts["instances"] - 1, MaxCount=counts["instances"] - 1)
        for t in range(counts["launch_templates"]):
            lt = ec2.create_launch_template(
                LaunchTemplateName=f"lt{t}", LaunchTemplateData={"ImageId": ids[t]}
            )
            for v in range(counts["versions_per_template"] - 1):
                ec2.create_launch_template_version(
                    LaunchTemplateId=lt["LaunchTemplate"]["LaunchTemplateId"],
                    LaunchTemplateData={"ImageId": ids[v]},
                )
        for p in range(counts["parameters"]):
            ssm.put_parameter(Name=f"/p/{p}", Value=ids[p], Type="String")
        clients = RegionClients("us-east-1")
        counters = {
            name: count_calls(getattr(clients, name))
            for name in ("ec2", "ssm", "autoscaling", "batch", "emr", "rbin")
        }
        start = time.perf_counter()
        inventory = load_inventory(clients, policy)
        took = time.perf_counter() - start
    calls: dict[str, int] = {}
    for counter in counters.values():
        calls.update(counter)
    lt = counts["launch_templates"]
    # moto answers DescribeParameters 10 at a time whatever MaxResults asks (the inventory asks 50), so the
    # emulator's own page size is the bound there; every other page size is the API's largest.
    lower = {
        "ec2:DescribeImages": math.ceil(counts["images"] / 1000),
        "ec2:DescribeInstances": math.ceil(counts["instances"] / 1000),
        "ec2:DescribeLaunchTemplates": math.ceil(lt / 200),
        "ec2:DescribeLaunchTemplateVersions": lt * math.ceil(counts["versions_per_template"] / 200),
        "ec2:DescribeSnapshots": 1,
        "ec2:DescribeFleets": 1,
        "ec2:DescribeSpotFleetRequests": 1,
        "ec2:DescribeSpotInstanceRequests": 1,
        "ssm:DescribeParameters": math.ceil(counts["parameters"] / 10),
        "ssm:GetParameters": math.ceil(counts["parameters"] / 10),
        "autoscaling:DescribeAutoScalingGroups": 1,
        "autoscaling:DescribeLaunchConfigurations": 1,
        "batch:DescribeComputeEnvironments": 1,
        "elasticmapreduce:ListClusters": 1,
        "rbin:ListRules": 2,
        "ec2:GetImageBlockPublicAccessState": 1,
    }
    print(f"\ninventory of one region on moto ({counts}; {took:.2f} s, error={inventory.error}):")
    print(f"  {'operation':<44}{'calls':>6}{'lower bound':>13}{'over':>6}")
    for op in sorted(set(calls) | set(lower)):
        over = calls.get(op, 0) - lower.get(op, 0)
        print(f"  {op:<44}{calls.get(op, 0):>6}{lower.get(op, '-'):>13}{over:>6}")
    total, bound = sum(calls.values()), sum(lower.values())
    print(
        f"  total {total} calls; lower bound {bound} (moto ends SSM's pages with an empty one: +2 allowed) "
        f"{verdict(total <= bound + 2)}; no per-AMI call (launch "
        "permissions and DescribeImageReferences are read after the plan, for the AMIs it acts on; Recycle "
        "Bin is absent from moto: one call answered as not offered here, then a note)"
    )


# A network's round trip for each call (moto in this process answers at once): what reading sources
# side by side saves.
ROUND_TRIP_SECONDS = 0.025


def bench_inventory_round_trips() -> None:
    import boto3
    import botocore.session
    from moto import mock_aws

    from ami_janitor.aws import ledger
    from ami_janitor.aws.clients import READ_WORKERS, RegionClients
    from ami_janitor.aws.inventory import load_inventory
    from ami_janitor.demo import emulator

    policy = parse_policy(
        {"regions": ["us-east-1"], "families": [{"name": "app", "match": {"name": "app-*"}}]}
    )
    emulator.install()
    taken: dict[tuple[str, int], list[float]] = {}
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="us-east-1")
        ledger.create_table(
            RegionClients("us-east-1"), policy.ledger.table, ["arn:aws:iam::123456789012:root"]
        )
        for region in ("empty", "one family AMI"):
            if region != "empty":
                ec2.register_image(Name="app-1")
            # Each way six times, taking turns; the first round (it loads what a process loads once) dropped.
            for _ in range(6):
                for workers in (READ_WORKERS, 1):
                    session = botocore.session.get_session()
                    session.set_config_variable("region", "us-east-1")
                    session.register("before-call", lambda **_: time.sleep(ROUND_TRIP_SECONDS))
                    clients = RegionClients("us-east-1", session, read_workers=workers)
                    start = time.perf_counter()
                    inventory = load_inventory(clients, policy)
                    taken.setdefault((region, workers), []).append(time.perf_counter() - start)
                    if inventory.error is not None:
                        raise RuntimeError(inventory.error)
    print(
        f"\nan inventory's wall time, {ROUND_TRIP_SECONDS * 1000:.0f} ms of round trip added to each call "
        "(moto; medians of 5):"
    )
    for region in ("empty", "one family AMI"):
        alone, ahead = (statistics.median(taken[region, workers][1:]) for workers in (1, READ_WORKERS))
        print(
            f"  {region} region: {alone * 1000:.0f} ms reading one source after another, {ahead * 1000:.0f} ms "
            f"with the sources that depend on no other read side by side ({READ_WORKERS} read workers)"
        )


def _policy_load_seconds(families: list[dict[str, Any]]) -> float:
    start = time.perf_counter()
    parse_policy({"regions": ["us-east-1"], "families": families})
    return time.perf_counter() - start


def bench_policy_load() -> None:
    families = [{"name": f"f{n}", "match": {"name": f"f{n}-*"}} for n in range(100_000)]
    took = _policy_load_seconds(families)
    print(
        f"\npolicy of {len(families):,} families validated in {took:.2f} s (the checks are linear; "
        f"target < 10 s) {verdict(took < 10)}"
    )
    # Every family matched by name and tag, every other one sharing: the check that no two families
    # that share differently are told apart by tags alone compares each with few others.
    sharing = {"share_with": {"accounts": ["123456789012"]}}
    tagged = [
        {"name": f"f{n}", "match": {"name": f"f{n}-*", "tags": {"Team": "x"}}, **(sharing if n % 2 else {})}
        for n in range(100_000)
    ]
    took = _policy_load_seconds(tagged)
    print(
        f"  the same, each family matched by tags too and every other one sharing: {took:.2f} s "
        f"(target < 10 s) {verdict(took < 10)}"
    )


def _fresh_interpreter_time(snippet: str, env: dict[str, str]) -> float:
    """The time `snippet` prints (its last line), run in a fresh interpreter."""
    answer = subprocess.run(
        [sys.executable, "-X", "frozen_modules=on", "-c", snippet],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(answer.stdout.strip().splitlines()[-1])


# The cleanup function's cold start: a fresh interpreter imports the handler and answers one scheduled
# event on an empty region, timed from the import to the answer (the libraries' import is timed the same
# way). The region is `ami-janitor emulator --empty` in another process: moto in this one would import
# boto3 and most of its dependencies before the clock starts, and its objects would slow every garbage
# collection the function triggers.
FIRST_INVOCATION = """
import time
started = time.perf_counter()
from ami_janitor.handlers import scheduled
class Context:
    function_name = "ami-janitor"; memory_limit_in_mb = 256; aws_request_id = "bench"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:ami-janitor"
event = {"version": "0", "id": "bench", "detail-type": "Scheduled Event", "source": "aws.events",
    "account": "123456789012", "time": "2026-11-25T03:00:00Z", "region": "us-east-1", "resources": [], "detail": {}}
scheduled.handler(event, Context())
print(time.perf_counter() - started)
"""
# What any function of these libraries pays before it knows a region is empty: their import, the
# janitor's session (its cut of the SDK's data), an EC2 client and one DescribeImages call.
FLOOR = """
import time
started = time.perf_counter()
import boto3; from pydantic import BaseModel; from aws_lambda_powertools import Logger, Metrics
from ami_janitor.aws.clients import janitor_session
janitor_session().create_client("ec2", region_name="us-east-1").describe_images(Owners=["self"])
print(time.perf_counter() - started)
"""
# `import pydantic` alone loads two modules (its names are imported on first use): the library's
# import is its BaseModel.
LIBRARIES = "import boto3; from pydantic import BaseModel; from aws_lambda_powertools import Logger, Metrics"
# Shown beside it, not judged: the functions make their clients from botocore sessions and never import
# boto3, so the libraries they do import are botocore's session, pydantic and Powertools.
LIBRARIES_IMPORTED = "import botocore.session; from pydantic import BaseModel; from aws_lambda_powertools import Logger, Metrics"
# Shown beside it, not judged: pydantic loads its field machinery (pydantic.fields, pydantic.types,
# annotated_types) when the first model's class is made, so any function with one model pays it too.
LIBRARIES_WITH_FIELDS = f"{LIBRARIES}; import pydantic.fields"
# Shown beside it, not judged: the libraries imported with the collector paused, as each handler module
# pauses it around its imports (handlers.collector_paused): the judged figure credits the cold start with
# what that pause saves on the libraries' own import, which this ratio leaves out.
LIBRARIES_PAUSED = f"import gc; gc.disable(); {LIBRARIES}; gc.freeze(); gc.enable()"
TIMED = "import time; t=time.perf_counter(); {}; print(time.perf_counter()-t)"
COLD_START_POLICY = """{"mode": "enforce", "regions": ["us-east-1"], "families": [{"name": "app", "match": {"name": "app-*"}}]}"""


def _compiled_package() -> str:
    """A directory holding a copy of the package with its bytecode, for PYTHONPATH. The libraries it is
    compared with are imported from their bytecode (pip compiles them at install), while the checkout
    has none under `make bench` (PYTHONDONTWRITEBYTECODE) and has it once run without: the package is
    timed compiled, like them, whichever way the bench is run."""
    import compileall
    import tempfile

    import ami_janitor

    source = os.path.dirname(ami_janitor.__file__)
    copy = tempfile.mkdtemp(prefix="ami-janitor-bench-")
    atexit.register(shutil.rmtree, copy, ignore_errors=True)
    target = os.path.join(copy, "ami_janitor")
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    if not compileall.compile_dir(target, quiet=1):
        raise RuntimeError(f"cannot compile {target}")
    return os.path.dirname(target)


def _against_emulator(
    package: str,
    snippets: Sequence[str],
    runs: int = 7,
    measure: Callable[[str, dict[str, str]], float] = _fresh_interpreter_time,
    rounds: list[list[float]] | None = None,
) -> list[float]:
    """The median over `runs` fresh interpreters of each snippet's `measure` (its printed time; the
    package from `package`), the snippets taking turns so that a busy moment weighs on each alike; after
    one round that warms the emulator (its own start is not the function's). `rounds` receives each
    snippet's measures, round by round, for ratios within a round."""
    cli = os.path.join(os.path.dirname(sys.executable), "ami-janitor")
    server = subprocess.Popen(
        [cli, "emulator", "--empty", "--exit-after", "600"], stdout=subprocess.PIPE, text=True
    )
    try:
        env = _emulator_environment(server.stdout)
        config = os.path.join(os.path.dirname(env["AMI_JANITOR_CONFIG"]), "cold-start.json")
        with open(config, "w", encoding="utf-8") as out:
            out.write(COLD_START_POLICY)
        env.update(_function_environment())  # as the stack deploys the functions
        env.update(
            AMI_JANITOR_CONFIG=config,
            AWS_REGION="us-east-1",
            POWERTOOLS_LOG_LEVEL="WARNING",
            PYTHONPATH=package,
        )
        subprocess.run([cli, "ledger", "create"], env=env, check=True, capture_output=True)
        times: list[list[float]] = [[] for _ in snippets]
        for round_ in range(runs + 1):
            for taken, snippet in zip(times, snippets, strict=True):
                # The warming round is timed whatever is measured: it is dropped.
                taken.append((measure if round_ else _fresh_interpreter_time)(snippet, env))
    finally:
        server.terminate()
        server.wait()
    if rounds is not None:
        rounds.extend(taken[1:] for taken in times)
    return [statistics.median(taken[1:]) for taken in times]


def _with_infra() -> None:
    """The repository's root on the path, for `infra` (the stack's constants and the asset's bundler)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)


def _function_environment() -> dict[str, str]:
    """The variables every deployed function has (infra.environment), but the policy's path."""
    _with_infra()
    from infra.environment import AMI_JANITOR_CONFIG, common_environment

    return {name: value for name, value in common_environment().items() if name != AMI_JANITOR_CONFIG}


# What Lambda's runtime imports of the libraries it cannot avoid, from the asset's bytecode or (as
# before the asset carried any) from sources: /var/task is read-only, so nothing compiled is kept.
# Only the pure-Python part imports here: the asset's pydantic-core is built for arm64.
ASSET_LIBRARIES = (
    "import time; t=time.perf_counter(); import boto3, botocore.session; "
    "from aws_lambda_powertools import Logger, Metrics; print(time.perf_counter()-t)"
)


def bench_asset_bytecode() -> None:
    _with_infra()
    import tempfile

    from infra import bundle

    python = bundle.runtime_python()
    if python is None:
        print(f"\nthe asset's bytecode: no Python {bundle.PYTHON_VERSION} here, the asset ships sources only")
        return
    deps = bundle.dependencies()
    sources = os.path.join(tempfile.mkdtemp(prefix="ami-janitor-bench-"), "deps")
    shutil.copytree(deps, sources, copy_function=os.link, ignore=shutil.ignore_patterns("__pycache__"))
    times: dict[str, list[float]] = {"bytecode": [], "sources": []}
    for _ in range(6):
        for name, path in (("bytecode", str(deps)), ("sources", sources)):
            env = {"PYTHONPATH": path, "PATH": os.environ.get("PATH", "")}
            answer = subprocess.run(
                [python, "-B", "-c", ASSET_LIBRARIES], env=env, capture_output=True, text=True, check=True
            )
            times[name].append(float(answer.stdout))
    shutil.rmtree(os.path.dirname(sources))
    compiled, plain = (statistics.median(times[k][1:]) for k in ("bytecode", "sources"))
    print(
        f"\nthe asset's bytecode (Python {bundle.PYTHON_VERSION}, unchecked hashes): the runtime imports boto3, "
        f"botocore's session and Powertools Logger and Metrics from the asset in {compiled * 1000:.0f} ms, "
        f"{plain * 1000:.0f} ms from its sources alone (median of 5 fresh interpreters each): "
        f"{(plain - compiled) * 1000:.0f} ms less of each deployed cold start, before pydantic and the package"
    )


def _paired(measures: Sequence[float], libraries: Sequence[float]) -> float:
    """The median of the ratios within each round: a busy minute slows both sides of a round alike."""
    return statistics.median(m / lib for m, lib in zip(measures, libraries, strict=True))


def bench_cold_start() -> None:
    package = _compiled_package()
    rounds: list[list[float]] = []
    libraries, handler, cold, floor, with_fields, imported, paused = _against_emulator(
        package,
        [
            TIMED.format(LIBRARIES),
            TIMED.format("import ami_janitor.handlers.scheduled"),
            FIRST_INVOCATION,
            FLOOR,
            TIMED.format(LIBRARIES_WITH_FIELDS),
            TIMED.format(LIBRARIES_IMPORTED),
            TIMED.format(LIBRARIES_PAUSED),
        ],
        rounds=rounds,
    )
    print(
        f"\nimport of the cleanup handler module: median {handler * 1000:.0f} ms "
        f"(target < 300 ms) {verdict(handler < 0.3)}; the libraries it cannot avoid (boto3, pydantic's "
        f"BaseModel, Powertools Logger and Metrics) {libraries * 1000:.0f} ms (both from bytecode; each figure here "
        "the median of 7 fresh interpreters, the seven measures taking turns)"
    )
    print(
        f"its cold start, import and first invocation on an empty region (`ami-janitor emulator --empty`): "
        f"median {cold * 1000:.0f} ms (the invocation about "
        f"{(cold - handler) * 1000:.0f} ms), ratio to the libraries' import {cold / libraries:.2f} "
        f"(target <= 1.30) {verdict(cold <= 1.3 * libraries)}"
    )
    print(
        f"  the floor, the libraries' import plus a janitor session, an EC2 client and one DescribeImages: "
        f"{floor * 1000:.0f} ms, ratio {floor / libraries:.2f}; the handler's cold start is "
        f"{(cold - floor) * 1000:.0f} ms over it"
    )
    print(
        f"  beside it, not judged: the ratios within each round (the libraries and the cold start measured "
        f"one after the other), their median: the cold start {_paired(rounds[2], rounds[0]):.2f}, the floor "
        f"{_paired(rounds[3], rounds[0]):.2f} (a floor ratio far from 1.06-1.11 marks a busy machine)"
    )
    print(
        f"  beside it, not judged: the libraries with pydantic's field machinery, which the first model's "
        f"class loads, {with_fields * 1000:.0f} ms; the cold start {cold / with_fields:.2f} times that"
    )
    print(
        f"  beside it, not judged: the libraries the function does import (botocore's session in place of boto3, "
        f"which it never imports) {imported * 1000:.0f} ms; the cold start {cold / imported:.2f} times that"
    )
    print(
        f"  beside it, not judged: the libraries with the collector paused while they load, as the handler "
        f"pauses it around its imports, {paused * 1000:.0f} ms; the cold start {cold / paused:.2f} times that"
    )


# The cleanup handler's import made `depth` calls down, as the Lambda runtime makes it from a depth of its
# own: its processor time (the process's, so a busy machine's other work weighs less) and its page faults. Without the wide stack (handlers.imported_on_a_wide_stack), work
# that recurses across the edge of one of CPython's 16 KiB frame chunks maps and unmaps it each time.
IMPORT_AT_DEPTH = """
import importlib, resource, sys, time
def down(depth):
    if depth:
        return down(depth - 1)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    started = time.process_time()
    importlib.import_module("ami_janitor.handlers.scheduled")
    took = time.process_time() - started
    return took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(*down(int(sys.argv[1])))
"""
IMPORT_DEPTHS = (0, 8, 16, 24, 32, 40)


def _without_the_wide_stack(package: str) -> str:
    """A copy of the compiled package whose handlers import on the stack they are given."""
    import compileall
    import tempfile

    copy = tempfile.mkdtemp(prefix="ami-janitor-bench-")
    atexit.register(shutil.rmtree, copy, ignore_errors=True)
    target = os.path.join(copy, "ami_janitor")
    shutil.copytree(
        os.path.join(package, "ami_janitor"), target, ignore=shutil.ignore_patterns("__pycache__")
    )
    handlers = os.path.join(target, "handlers", "__init__.py")
    with open(handlers, encoding="utf-8") as source:
        text = source.read()
    wide = "_on_a_wide_stack.__code__ = "
    if wide not in text:
        raise RuntimeError(f"{handlers} no longer widens its stack as this bench expects")
    with open(handlers, "w", encoding="utf-8") as out:
        out.write(text.replace(wide, "_narrow = "))
    if not compileall.compile_dir(target, quiet=1):
        raise RuntimeError(f"cannot compile {target}")
    return copy


def bench_import_depth() -> None:
    package = _compiled_package()
    packages = {"wide": package, "narrow": _without_the_wide_stack(package)}
    env = {**os.environ, **_function_environment(), "AWS_DEFAULT_REGION": "us-east-1"}
    taken: dict[tuple[str, int], list[tuple[float, int]]] = {}
    for _ in range(6):
        for depth in IMPORT_DEPTHS:
            for stack, path in packages.items():
                answer = subprocess.run(
                    [sys.executable, "-X", "frozen_modules=on", "-c", IMPORT_AT_DEPTH, str(depth)],
                    env={**env, "PYTHONPATH": path},
                    capture_output=True,
                    text=True,
                    check=True,
                )
                took, faults = answer.stdout.split()
                taken.setdefault((stack, depth), []).append((float(took), int(faults)))
    faults = {key: statistics.median(f for _, f in runs[1:]) for key, runs in taken.items()}
    # Each narrow import against the wide one just before it: a slow minute weighs on both.
    saved = [
        narrow[0] - wide[0]
        for depth in IMPORT_DEPTHS
        for wide, narrow in zip(taken["wide", depth][1:], taken["narrow", depth][1:], strict=True)
    ]
    print(
        f"\nthe cleanup handler's import made {', '.join(map(str, IMPORT_DEPTHS))} calls down (the Lambda runtime "
        "imports it from a depth of its own; 5 fresh interpreters each, after a round that warms the disk "
        "cache), its page faults on the wide stack and without it:"
    )
    for stack in packages:
        print(f"  {stack}: {', '.join(f'{faults[stack, depth]:,.0f}' for depth in IMPORT_DEPTHS)}")
    print(
        f"  the processor time it saves, each import without it against the one on it just before: median "
        f"{statistics.median(saved) * 1000:.0f} ms, quartiles {statistics.quantiles(saved, n=4)[0] * 1000:.0f} "
        f"and {statistics.quantiles(saved, n=4)[2] * 1000:.0f} ms"
    )


def _instructions(snippet: str, env: dict[str, str]) -> float:
    """The instructions a fresh interpreter runs for `snippet`, counted by valgrind: the same on a quiet
    machine and a busy one (unlike time; the collector's cache misses, which instructions do not see,
    weigh more in time)."""
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable]
    answer = subprocess.run(
        [*command, "-X", "frozen_modules=on", "-c", snippet],
        env={**env, "PYTHONHASHSEED": "0"},
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"Collected : (\d+)", answer.stderr)
    if found is None:
        raise RuntimeError(f"valgrind printed no count: {answer.stderr[-300:]}")
    return float(found[1])


def bench_cold_start_instructions() -> None:
    if shutil.which("valgrind") is None:
        print("\nthe cold start in instructions: no valgrind here")
        return
    libraries, cold, floor, with_fields, imported, paused = _against_emulator(
        _compiled_package(),
        [
            TIMED.format(LIBRARIES),
            FIRST_INVOCATION,
            FLOOR,
            TIMED.format(LIBRARIES_WITH_FIELDS),
            TIMED.format(LIBRARIES_IMPORTED),
            TIMED.format(LIBRARIES_PAUSED),
        ],
        runs=1,
        measure=_instructions,
    )
    print(
        f"\nthe cold start in instructions (valgrind; one fresh interpreter each): {cold / 1e6:,.0f} million, "
        f"{cold / libraries:.2f} times the libraries' import ({libraries / 1e6:,.0f} million; target 1.30 in "
        f"time) {verdict(cold <= 1.3 * libraries)}; the floor {floor / 1e6:,.0f} million, {floor / libraries:.2f}"
    )
    print(
        f"  beside it, not judged: the libraries with pydantic's field machinery {with_fields / 1e6:,.0f} million; "
        f"the cold start {cold / with_fields:.2f} times that; the libraries the function does import (botocore's "
        f"session in place of boto3) {imported / 1e6:,.0f} million, the cold start {cold / imported:.2f} times that"
    )
    print(
        f"  beside it, not judged: the libraries with the collector paused while they load, as the handler pauses "
        f"it, {paused / 1e6:,.0f} million; the cold start {cold / paused:.2f} times that"
    )


def _emulator_environment(line_source: Any) -> dict[str, str]:
    """The `export` lines `ami-janitor emulator` prints, as an environment."""
    env = dict(os.environ)
    for line in iter(line_source.readline, ""):
        if line.startswith("export "):
            for pair in line.split("#")[0].split()[1:]:
                name, _, value = pair.partition("=")
                env[name] = value
        if line.startswith("ami-janitor "):  # the last line: the command to try
            return env
    raise RuntimeError("the emulator ended before it printed its environment")


def bench_cli_plan_on_emulator() -> None:
    cli = os.path.join(os.path.dirname(sys.executable), "ami-janitor")
    server = subprocess.Popen([cli, "emulator", "--exit-after", "300"], stdout=subprocess.PIPE, text=True)
    try:
        env = _emulator_environment(server.stdout)
        subprocess.run([cli, "ledger", "create"], env=env, check=True, capture_output=True)
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            done = subprocess.run([cli, "plan"], env=env, capture_output=True, text=True)
            runs.append(time.perf_counter() - start)
            if done.returncode != 0:
                raise RuntimeError(f"plan exited {done.returncode}: {done.stderr}")
    finally:
        server.terminate()
        server.wait()
    print(
        f"\n`ami-janitor plan` against `ami-janitor emulator` (the demo account, its environment lines): "
        f"median {statistics.median(runs):.2f} s, max {max(runs):.2f} s over 5 runs, process start "
        f"included (target < 2 s) {verdict(statistics.median(runs) < 2)}"
    )


def bench_tls_connections() -> None:
    """New HTTPS connections as a cold start makes them: two clients, three calls (an empty region's),
    each on a new connection, against a loopback endpoint whose CA is appended to the SDK's own bundle
    (so that loading the bundle costs what it costs in Lambda)."""
    import tempfile
    from pathlib import Path

    from botocore.config import Config
    from botocore.httpsession import get_cert_path

    from ami_janitor.aws import clients as clients_module
    from ami_janitor.aws.clients import RegionClients, janitor_session

    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from tls_server import authority, tls_endpoint

    directory = Path(tempfile.mkdtemp(prefix="ami-janitor-bench-tls-"))
    ca = authority(directory, "bench-ca")
    bundle = directory / "bundle.pem"
    bundle.write_bytes(Path(get_cert_path(True)).read_bytes() + ca.bundle.read_bytes())
    saved = {name: os.environ.get(name) for name in ("AWS_CA_BUNDLE", "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_CA_BUNDLE=str(bundle), AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")

    def botocore_clients() -> list[Any]:  # the same session, but each client's TLS context botocore's
        session = janitor_session()
        config = Config(retries={"total_max_attempts": 1})
        return [session.create_client("ec2", region_name="us-east-1", config=config) for _ in range(2)]

    def janitor_clients() -> list[Any]:
        clients_module._VERIFIED_CONTEXTS.clear()  # as in a new process
        return [RegionClients("us-east-1", janitor_session()).ec2 for _ in range(2)]

    def warm_janitor_clients() -> list[Any]:  # a later invocation of the same process
        return [RegionClients("us-east-1", janitor_session()).ec2 for _ in range(2)]

    taken: dict[str, list[float]] = {}
    try:
        with tls_endpoint(directory, ca) as endpoint:
            os.environ["AWS_ENDPOINT_URL"] = endpoint
            for round_ in range(8):
                for name, make in (
                    ("botocore", botocore_clients),
                    ("janitor", janitor_clients),
                    ("janitor, warm", warm_janitor_clients),
                ):
                    start = time.perf_counter()
                    first, second = make()
                    for client in (first, first, second):
                        client.describe_images(Owners=["self"])
                    if round_:
                        taken.setdefault(name, []).append(time.perf_counter() - start)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(directory)
    plain, shared, warm = (
        statistics.median(taken[k]) * 1000 for k in ("botocore", "janitor", "janitor, warm")
    )
    print(
        f"\nnew HTTPS connections (two clients, three calls, each on a new connection, the SDK's CA bundle; "
        f"median of 7): with botocore's TLS contexts {plain:.0f} ms (the bundle loaded at each connection), the "
        f"janitor's {shared:.0f} ms in a new process (loaded once), {warm:.0f} ms in a later invocation "
        f"(not loaded): {plain - shared:.0f} ms less of a cold start, {plain - warm:.0f} ms less of each later "
        "invocation, and each read worker's connection in a region with AMIs saves about one load (no target: "
        "the emulator's endpoint, which the cold start above is timed on, is http)"
    )


def bench_fleet() -> None:
    import fleet

    from ami_janitor.core.slices import MAX_SLICE_ITEMS

    amis, due = 50_000, 10_000
    run = fleet.simulate(amis, due)
    fewest = max(math.ceil(due / MAX_SLICE_ITEMS), math.ceil(due / run.refill / run.budget))
    longest = run.longest
    reading = statistics.mean(i.reading for i in run.invocations)
    ec2 = sum(run.ec2_calls.values())
    every = sum(run.calls.values()) + sum(run.scheduled_calls.values())
    per_api = ", ".join(
        f"{name} {count / run.deregistered:.3f}" for name, count in run.ec2_calls.most_common()
    )
    others = run.calls + run.scheduled_calls
    beside = ", ".join(
        f"{name} {count / run.deregistered:.4f}"
        for name, count in sorted(others.items(), key=lambda kv: (-kv[1], kv[0]))
        if not name.startswith("ec2:")
    )
    print(
        f"\nfleet simulator (bench/fleet.py): {amis:,} AMIs in one region, {run.planned_deregistrations:,} "
        f"due deregistrations planned, through the slices on the in-memory EC2 (the account's token "
        f"buckets, {run.latency:g} s simulated per call of any service, {run.gap:g} s between "
        f"invocations; each slice the worker's code on its queue message, a new pacer that starts empty and "
        f"{run.workers} AMIs in flight, as the worker keeps them); {run.wall:.1f} s of wall time"
    )
    print(
        f"  invocations: {len(run.invocations)} slices of up to {max(i.amis for i in run.invocations):,} AMIs "
        f"(the fewest the cut allows: {fewest}) {verdict(len(run.invocations) <= fewest)}; the scheduled run "
        f"that cut them made {sum(run.scheduled_calls.values())} calls after its plan "
        f"({', '.join(f'{k} {n}' for k, n in sorted(run.scheduled_calls.items()))}); "
        f"{run.summaries} report and {run.notifications} summary sent, by the last slice"
    )
    print(
        f"  longest invocation: {longest.seconds / 60:.2f} min simulated (slice {longest.index + 1}, "
        f"{longest.amis:,} AMIs, {longest.reading:.1f} s reading them again) (goal < 10 min) "
        f"{verdict(longest.seconds < 600)}"
    )
    print(
        f"  DeregisterImage: {run.deregistered:,} in {run.span / 60:.1f} min, {run.rate:.2f}/s against the "
        f"bucket's refill {run.refill:g}/s: ratio {run.ratio:.3f} (goal >= 0.90) {verdict(run.ratio >= 0.9)}; "
        f"each slice reads {reading:.1f} s before its first write"
    )
    print(
        f"  RequestLimitExceeded answers: {run.refused} (goal 0) {verdict(run.refused == 0)}; every due AMI "
        f"deregistered by exactly one call: {verdict(run.once)}; results {dict(run.statuses)}, held back "
        f"{run.held}"
    )
    print(
        f"  API calls per retired AMI, every service's, the scheduled run's after its plan and the "
        f"slices': {every / run.deregistered:.3f}; EC2 {ec2 / run.deregistered:.3f} ({per_api}) (goal <= 2.5: "
        f"DeregisterImage and the snapshot's mirror tag, and the slice's reads) "
        f"{verdict(ec2 / run.deregistered <= 2.5)}; the others {(every - ec2) / run.deregistered:.3f} "
        f"({beside}; ledger writes {run.ledger_writes / run.deregistered:.2f} of the DynamoDB UpdateItem)"
    )
    # Each AMI's ledger record, CreateTags, DeregisterImage and ledger confirmation go one after another:
    # with one AMI in flight, past 1 / (4 x refill) = 0.05 s a call the latency and not the bucket would
    # set the rate; the worker's AMIs in flight keep it at the bucket's.
    slow = fleet.simulate(10_000, 2_000, latency=0.1)
    alone = fleet.simulate(10_000, 2_000, latency=0.1, workers=1)
    print(
        f"  the same with 0.1 s per call (10,000 AMIs, 2,000 due): ratio {slow.ratio:.3f} with "
        f"{slow.workers} AMIs in flight (goal >= 0.90) {verdict(slow.ratio >= 0.9)}; with one AMI in flight "
        f"{alone.ratio:.3f}: its four calls go one after another, at most 1 / (4 x latency) = "
        f"{1 / (4 * 0.1):g} AMIs/s"
    )


ORG_REGIONS = 3  # regions `make bench` simulates of the 17 (every account in each)


def bench_org(regions: int = ORG_REGIONS) -> None:
    import org

    consumers = 99
    result = org.simulate_org(consumers, org.REGIONS[:regions])
    owner, users = result.owner_runs, result.consumer_runs
    rest = len(org.REGIONS) - regions
    scope = (
        f"all {len(org.REGIONS)} regions"
        if not rest
        else f"{regions} of the {len(org.REGIONS)} regions (every account in each; the regions are generated "
        f"alike and run independently, each with its own token buckets and reports, so the {rest} others "
        "repeat these figures: the organization's day is as long as one region's)"
    )
    print(
        f"\norganization simulator (bench/org.py): {consumers + 1} accounts, one owner of "
        f"{len(org.GOLDEN)} golden families shared with the organization and {consumers} consumers with "
        f"2 to {len(org.APPS)} families of their own, {org.DAYS} daily AMIs a family in its steady state; "
        f"simulated in {scope}: {len(result.runs)} account-regions, {result.wall:.0f} s of wall time"
    )
    print(
        f"  model: consumers first. Every consumer account-region runs at the scheduled hour, all in "
        f"parallel; the owner's regions start once the last consumer report is in the inbox "
        f"(+{result.owner_start:.1f} s), in parallel. Each account-region is its own chain of invocations "
        f"(the scheduled run, then its slices {org.GAP:g} s apart) on its own EC2 token buckets, "
        f"{org.LATENCY:g} s per call of every service (their own limits not modelled: EC2's only)"
    )
    longest = result.longest
    print(
        f"  org-wide daily run: {result.day / 60:.2f} min simulated (the last consumer report at "
        f"+{result.owner_start:.1f} s, the owner's longest region {max(r.seconds for r in owner):.1f} s, "
        f"the longest account-region {longest.seconds:.1f} s: {longest.account} in {longest.region}) "
        f"(goal <= 4 h) {verdict(result.day <= 4 * 3600)}"
    )
    scheduled = max(i.seconds for r in result.runs for i in r.invocations if i.kind == "scheduled")
    sliced = [i.seconds for r in result.runs for i in r.invocations if i.kind == "slice"]
    print(
        f"  longest invocation: a scheduled run {scheduled:.1f} s, a slice {max(sliced, default=0):.1f} s "
        f"(goal < 15 min, the function's timeout) {verdict(max([scheduled, *sliced]) < 900)}; "
        f"{len(sliced)} slices in all"
    )
    amis = {r.region: len(r.decisions) for r in owner}
    per_ami = max(r.total_calls / max(1, len(r.decisions)) for r in result.runs)
    print(
        f"  API calls per account-region: consumers mean {result.mean_calls(users):.0f}, max "
        f"{max(r.total_calls for r in users)}; the owner mean {result.mean_calls(owner):.0f}, max "
        f"{max(r.total_calls for r in owner)} (of which report reads {owner[0].calls['s3:GetObject']}); "
        f"at most {per_ami:.2f} per AMI the region holds (no target: the owner's report reads grow with its "
        "consumers, one per consumer for the plan and one per consumer of each slice's shared AMIs)"
    )
    calls: Counter[str] = Counter()
    for run in users:
        calls.update(run.calls)
    top = ", ".join(f"{api} {n / len(users):.1f}" for api, n in calls.most_common(6))
    print(f"  a consumer's mean calls: {top}, ...")
    refused = sum(r.refused for r in result.runs)
    print(f"  RequestLimitExceeded answers: {refused} (goal 0) {verdict(refused == 0)}")
    used = sum(
        1
        for r in owner
        for d in r.decisions.values()
        if any(x.startswith("used in account") for x in d.reasons)
    )
    retired = sum(len(r.gone) + len(r.disabled) for r in owner)
    reports = len(result.inbox.keys(org.INBOX_BUCKET))
    failed = sum(r.statuses.get("failed", 0) for r in result.runs)
    wrong = sum(r.tampered + len(r.skipped) for r in result.runs) + failed
    print(
        f"  usage reports through the inbox: {reports} (one per account-region); the owner kept {used} "
        f"golden AMIs its consumers report used and retired {retired} nobody uses (disabled or deregistered) "
        f"in {len(amis)} regions; held back by a slice {sum(len(r.held) for r in result.runs)}; failed "
        f"actions, tampered tags and skipped regions {wrong} (goal 0) {verdict(wrong == 0)}"
    )


SECTIONS: dict[str, Callable[[], None]] = {
    "plan": bench_plan,
    "inventory": bench_inventory_calls,
    "round-trips": bench_inventory_round_trips,
    "policy": bench_policy_load,
    "cold-start": bench_cold_start,
    "cold-start-instructions": bench_cold_start_instructions,
    "import-depth": bench_import_depth,
    "bytecode": bench_asset_bytecode,
    "tls": bench_tls_connections,
    "cli": bench_cli_plan_on_emulator,
    "fleet": bench_fleet,
    "org": bench_org,
}


if __name__ == "__main__":
    unknown = sorted(set(sys.argv[1:]) - set(SECTIONS))
    if unknown:
        sys.exit(f"unknown section(s) {', '.join(unknown)}; the sections: {', '.join(SECTIONS)}")
    for name, section in SECTIONS.items():
        if not sys.argv[1:] or name in sys.argv[1:]:
            section()
