"""`ami-janitor` end to end against a moto server: plan, apply, rotate, rescue, exit codes."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest

from ami_janitor import cli
from sdk_faults import deny
from server import POLICY, ec2, image_ids, make_ledger, now, seed_fleet, snapshot_ids


def write_policy(tmp_path: Path, mode: str = "enforce", text: str | None = None) -> str:
    path = tmp_path / "janitor.yaml"
    path.write_text(text if text is not None else POLICY.format(mode=mode))
    return str(path)


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = cli.main(list(argv), out=out)
    return code, out.getvalue()


def test_plan_json_covers_every_family_ami_with_reasons(endpoint: str, tmp_path: Path) -> None:
    fleet = seed_fleet(now())
    code, output = run("plan", "--config", write_policy(tmp_path, "dry-run"), "--format", "json")
    assert code == 0
    plan = json.loads(output)
    assert plan["mode"] == "dry-run"
    assert plan["regions"] == [{"region": "us-east-1", "status": "ok", "error": None}]
    decisions = {d["image_id"]: d for d in plan["decisions"]}
    assert set(decisions) == set(fleet.images)
    assert [d["image_id"] for d in plan["decisions"]] == fleet.images[::-1]  # newest first
    assert decisions[fleet.images[-1]]["reasons"][0] == "among the 2 newest of its group (#1)"
    assert any(fleet.instance in r for r in decisions[fleet.referenced]["reasons"])
    assert {decisions[i]["action"] for i in (fleet.images[0], fleet.images[1], fleet.images[3])} == {
        "deregister"
    }
    assert plan["latest"][0]["to"] == fleet.images[-1]
    # dry-run wrote nothing
    assert image_ids() >= set(fleet.images)
    assert "Latest" not in {
        t["Key"] for t in ec2().describe_images(ImageIds=[fleet.images[-1]])["Images"][0].get("Tags", [])
    }


def test_apply_retires_what_nothing_keeps_with_its_snapshots(endpoint: str, tmp_path: Path) -> None:
    fleet = seed_fleet(now())
    make_ledger()
    code, output = run("apply", "--config", write_policy(tmp_path), "--yes")
    assert code == 0, output
    retired = {fleet.images[0], fleet.images[1], fleet.images[3]}
    remaining = image_ids()
    assert not retired & remaining
    assert {fleet.referenced, fleet.images[4], fleet.images[5]} <= remaining
    assert not {fleet.snapshots[i] for i in retired} & snapshot_ids()
    assert fleet.snapshots[fleet.referenced] in snapshot_ids()
    tags = {
        t["Key"]: t["Value"] for t in ec2().describe_images(ImageIds=[fleet.images[5]])["Images"][0]["Tags"]
    }
    assert tags["Latest"] == "true"
    assert "deregister" in output and "0 failed" in output
    # A second run finds nothing more to do.
    code, output = run("plan", "--config", write_policy(tmp_path), "--format", "json")
    plan = json.loads(output)
    assert {d["action"] for d in plan["decisions"]} == {"keep"}


def test_apply_json_report(endpoint: str, tmp_path: Path) -> None:
    seed_fleet(now())
    make_ledger()
    code, output = run("apply", "--config", write_policy(tmp_path), "--yes", "--format", "json")
    report = json.loads(output)
    assert code == 0
    assert report["summary"]["retired"] == 3 and report["summary"]["actions_failed"] == 0
    assert report["summary"]["snapshots_deleted"] == 3
    assert {r["action"] for r in report["results"]} >= {
        "mark-candidate",
        "deprecate",
        "disable",
        "deregister",
    }


def test_apply_refuses_a_dry_run_policy_and_needs_yes_without_a_terminal(
    endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_fleet(now())
    assert run("apply", "--config", write_policy(tmp_path, "dry-run"), "--yes")[0] == 2
    assert "apply writes only with mode: enforce" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert run("apply", "--config", write_policy(tmp_path))[0] == 2
    assert "pass --yes" in capsys.readouterr().err


def test_apply_asks_in_a_terminal_and_a_no_changes_nothing(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = seed_fleet(now())
    make_ledger()

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
    shared = POLICY.format(mode="enforce") + '    share_with: {accounts: ["111122223333"]}\n'
    code, output = run("apply", "--config", write_policy(tmp_path, text=shared))
    assert code == 3
    # The question counts every write apply would make, the shares included.
    assert "Apply 3 actions, 1 Latest changes, 3 shares and 0 copies? [y/N] declined" in output, output
    assert image_ids() >= set(fleet.images)
    monkeypatch.setattr(sys, "stdin", Terminal("y\n"))
    assert run("apply", "--config", write_policy(tmp_path))[0] == 0
    assert fleet.images[0] not in image_ids()


class Answering(io.StringIO):
    """A terminal whose person answers `y`, after `meanwhile` changed the account (while the plan was read)."""

    def __init__(self, meanwhile: Any = None) -> None:
        super().__init__()
        self.meanwhile = meanwhile

    def isatty(self) -> bool:
        return True

    def readline(self, *args: object) -> str:
        if self.meanwhile is not None:
            self.meanwhile()
        return "y\n"


def test_apply_writes_nothing_the_plan_it_asked_about_did_not_show(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """While the question waits, the stopped instance that kept an AMI is terminated: the plan made again
    would retire that AMI too, which the person was not asked about. Nothing is written (it was
    deregistered with the three actions confirmed)."""
    fleet = seed_fleet(now())
    make_ledger()
    monkeypatch.setattr(
        sys, "stdin", Answering(lambda: ec2().terminate_instances(InstanceIds=[fleet.instance]))
    )
    code, output = run("apply", "--config", write_policy(tmp_path))
    assert "Apply 3 actions" in output.split("[y/N]")[0]
    assert code == 3
    err = capsys.readouterr().err
    assert f"the plan changed since it was shown (deregister {fleet.referenced} in us-east-1" in err, err
    assert "nothing was written; run apply again to see the plan as it is now" in err
    assert image_ids() >= set(fleet.images)
    tags = ec2().describe_tags(Filters=[{"Name": "resource-id", "Values": fleet.images}])["Tags"]
    assert [t for t in tags if t["Key"] == "Latest" or t["Key"].startswith("ami-janitor:")] == []


def test_apply_leaves_what_the_plan_no_longer_asks_for(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the question waits, an instance is launched from the oldest AMI: the plan made again keeps
    it, and the rest of what was confirmed is written."""
    fleet = seed_fleet(now())
    make_ledger()

    def launch() -> None:
        ec2().run_instances(ImageId=fleet.images[0], MinCount=1, MaxCount=1)

    monkeypatch.setattr(sys, "stdin", Answering(launch))
    code, output = run("apply", "--config", write_policy(tmp_path))
    assert "Apply 3 actions" in output.split("[y/N]")[0]
    assert code == 0, output
    assert fleet.images[0] in image_ids()
    assert fleet.images[1] not in image_ids()


class Interrupting(io.StringIO):
    """A terminal whose person presses Ctrl-C at the question."""

    def isatty(self) -> bool:
        return True

    def readline(self, *args: object) -> str:
        raise KeyboardInterrupt


def test_ctrl_c_at_the_question_is_a_no_exit_3_and_nothing_is_written(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exit 3 says nothing was written: Ctrl-C at the question is a no, as an `n` is."""
    fleet = seed_fleet(now())
    make_ledger()
    monkeypatch.setattr(sys, "stdin", Interrupting())
    code, output = run("apply", "--config", write_policy(tmp_path))
    assert code == 3
    assert output.endswith("[y/N] \ndeclined: nothing was changed\n"), output
    assert image_ids() >= set(fleet.images)
    tags = ec2().describe_tags(Filters=[{"Name": "resource-id", "Values": fleet.images}])["Tags"]
    assert [t for t in tags if t["Key"] == "Latest"] == []


def test_ctrl_c_once_apply_wrote_exits_130_saying_changes_may_have_been_made(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 3 would tell a script that nothing was written: a Ctrl-C that stops `apply --yes` after it
    wrote (here: once the Latest tag and parameter are written) is 130, the shell's code for an
    interrupt, and says that changes may have been made. `plan` writes nothing, and says only that."""
    from ami_janitor import engine
    from ami_janitor.aws import rotator

    fleet = seed_fleet(now())
    make_ledger()
    config = write_policy(tmp_path)
    write_changes = rotator.write_changes

    def written_then_interrupted(*args: Any, **kwargs: Any) -> Any:
        write_changes(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(rotator, "write_changes", written_then_interrupted)
    code, _ = run("apply", "--config", config, "--yes")

    ssm = boto3.client("ssm", region_name="us-east-1")
    assert ssm.get_parameter(Name="/ami/web/latest")["Parameter"]["Value"] == fleet.images[-1]  # written
    assert code == 130
    assert capsys.readouterr().err == "ami-janitor: interrupted; apply may have made some of its changes\n"

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "run", interrupted)
    assert run("plan", "--config", config) == (130, "")
    assert capsys.readouterr().err == "ami-janitor: interrupted\n"


def test_apply_json_in_a_terminal_prints_the_report_alone(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_fleet(now())
    make_ledger()
    monkeypatch.setattr(sys, "stdin", Answering())
    code, output = run("apply", "--config", write_policy(tmp_path), "--format", "json")
    assert code == 0
    assert json.loads(output)["summary"]["retired"] == 3
    assert "Apply 3 actions, 1 Latest changes, 0 shares and 0 copies? [y/N] " in capsys.readouterr().err


def test_bad_policy_and_unknown_region_exit_2(
    endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = POLICY.format(mode="dry-run").replace("keep_latest: 2", "keep_latest: 0")
    assert run("plan", "--config", write_policy(tmp_path, text=bad))[0] == 2
    err = capsys.readouterr().err
    assert "defaults.keep_latest: must be >= 1" in err and "Traceback" not in err
    assert run("plan", "--config", write_policy(tmp_path), "--region", "ap-south-1")[0] == 2
    assert "not managed by the policy" in capsys.readouterr().err


def test_a_failing_reference_source_skips_the_region_and_exits_1(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_fleet(now())
    make_ledger()
    # Auto Scaling answers from a dead endpoint: that source fails, so nothing may be decided.
    monkeypatch.setenv("AWS_ENDPOINT_URL_AUTO_SCALING", "http://127.0.0.1:9")
    code, output = run("plan", "--config", write_policy(tmp_path), "--format", "json")
    plan = json.loads(output)
    assert code == 1
    assert plan["regions"][0]["status"] == "skipped"
    assert "autoscaling" in plan["regions"][0]["error"].lower()
    assert plan["decisions"] == []
    code, _ = run("apply", "--config", write_policy(tmp_path), "--yes")
    assert code == 1
    assert len(image_ids()) == 7  # six web AMIs and the base: untouched


def test_rescue_by_hand_restores_a_disabled_ami(endpoint: str, tmp_path: Path) -> None:
    fleet = seed_fleet(now())
    make_ledger()
    config = write_policy(
        tmp_path,
        text=POLICY.format(mode="enforce").replace("deregister_after_days: 0", "deregister_after_days: 30"),
    )
    assert run("apply", "--config", config, "--yes")[0] == 0
    target = fleet.images[0]
    state = ec2().describe_images(ImageIds=[target], IncludeDisabled=True)["Images"][0]
    assert state["State"] == "disabled"
    code, output = run("rescue", target, "--config", config)
    assert code == 0, output
    image = ec2().describe_images(ImageIds=[target])["Images"][0]
    assert image["State"] == "available"
    assert "DeprecationTime" not in image
    assert not [t for t in image.get("Tags", []) if t["Key"].startswith("ami-janitor:")]
    assert run("rescue", "ami-0000000000000dead", "--config", config)[0] == 2


def test_rescue_reaches_a_region_since_removed_from_the_policy(endpoint: str, tmp_path: Path) -> None:
    """A region removed from `regions` is read no more: what the janitor disabled there stays so, and
    `rescue --region` still undoes it from that region's ledger."""
    fleet = seed_fleet(now())
    make_ledger()
    text = POLICY.format(mode="enforce").replace("deregister_after_days: 0", "deregister_after_days: 30")
    assert run("apply", "--config", write_policy(tmp_path, text=text), "--yes")[0] == 0
    target = fleet.images[0]
    assert ec2().describe_images(ImageIds=[target], IncludeDisabled=True)["Images"][0]["State"] == "disabled"
    moved = write_policy(tmp_path, text=text.replace("regions: [us-east-1]", "regions: [eu-west-1]"))

    code, output = run("rescue", target, "--config", moved, "--region", "us-east-1")

    assert code == 0, output
    assert ec2().describe_images(ImageIds=[target])["Images"][0]["State"] == "available"
    assert run("rescue", target, "--config", moved, "--region", "useast1")[0] == 2


def test_rescue_in_a_region_the_sdk_does_not_know_is_refused_naming_the_nearest(
    endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A region outside the policy is not checked when it loads: a typo was met as a failure to reach
    an endpoint that does not exist (exit 1)."""
    code, _ = run(
        "rescue", "ami-0123456789abcdef0", "--config", write_policy(tmp_path), "--region", "us-esat-1"
    )
    assert code == 2
    assert "--region: unknown region us-esat-1 (did you mean us-" in capsys.readouterr().err


def test_rescue_without_a_ledger_is_refused_naming_ledger_create(
    endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a rescue undoes is what the ledger recorded: without the table it changes nothing."""
    fleet = seed_fleet(now())
    target = fleet.images[0]
    ec2().disable_image(ImageId=target)
    code, output = run("rescue", target, "--config", write_policy(tmp_path, "dry-run"))
    assert code == 2 and output == ""
    assert "`ami-janitor ledger create` makes it" in capsys.readouterr().err
    state = ec2().describe_images(ImageIds=[target], IncludeDisabled=True)["Images"][0]["State"]
    assert state == "disabled"


def test_rotate_in_dry_run_prints_and_in_enforce_writes(endpoint: str, tmp_path: Path) -> None:
    fleet = seed_fleet(now())
    code, output = run("rotate", "--config", write_policy(tmp_path, "dry-run"))
    assert code == 0 and "would be made" in output and fleet.images[-1] in output
    code, output = run("rotate", "--config", write_policy(tmp_path), "--format", "json")
    assert code == 0
    rotated = json.loads(output)["rotations"][0]
    assert rotated["to"] == fleet.images[-1]
    ssm = __import__("boto3").client("ssm", region_name="us-east-1")
    assert ssm.get_parameter(Name="/ami/web/latest")["Parameter"]["Value"] == fleet.images[-1]
    code, output = run("rotate", "--config", write_policy(tmp_path))
    assert "every Latest pointer is current" in output
    assert run("rotate", "--config", write_policy(tmp_path), "--family", "nope")[0] == 2


def test_rotate_of_a_family_without_latest_is_refused_not_called_current(
    endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_fleet(now())
    text = POLICY.format(mode="enforce") + '  - name: db\n    match: {name: "db-*"}\n'
    # `latest: {tag: null}` keeps the group's Latest but names no pointer: nothing to rotate either.
    text += '  - name: cache\n    match: {name: "cache-*"}\n    latest: {tag: null}\n'
    capsys.readouterr()
    for family in ("db", "cache"):
        code, output = run("rotate", "--config", write_policy(tmp_path, text=text), "--family", family)
        assert code == 2 and output == ""
        assert f"--family {family}: the family has no latest" in capsys.readouterr().err


def test_apply_whose_ledger_table_is_gone_since_its_check_is_refused_naming_ledger_create(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The table checked before the run (DescribeTable) is gone when the run's Scan reads it (deleted,
    or made again and still CREATING): refused before anything is written, exit 2 naming the fix, not
    a traceback."""
    from ami_janitor import engine

    fleet = seed_fleet(now())
    monkeypatch.setattr(engine, "require_ledgers", lambda *args, **kwargs: None)  # the check passed
    capsys.readouterr()

    code, _ = run("apply", "--config", write_policy(tmp_path), "--yes")

    assert code == 2
    assert "ledger create" in capsys.readouterr().err
    assert set(fleet.images) <= image_ids()


def test_a_plan_whose_copy_target_cannot_be_read_says_so_and_exits_1(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`plan --region` of a source region reads its copy targets' AMIs too: one that cannot be read gets
    no copy, and the plan says so (a skipped region, exit 1) rather than dropping the copies silently."""
    from ami_janitor.aws import inventory

    seed_fleet(now())
    make_ledger(("us-east-1", "eu-west-1"))
    config = write_policy(
        tmp_path, text=POLICY.format(mode="dry-run") + "    replicate: [{region: eu-west-1}]\n"
    )
    code, output = run("plan", "--config", config, "--region", "us-east-1", "--format", "json")
    assert code == 0 and json.loads(output)["copies"]

    read = inventory.load_images

    def eu_unreadable(clients: Any, policy: Any, *args: Any, **kwargs: Any) -> Any:
        loaded = read(clients, policy, *args, **kwargs)
        return (
            loaded._replace(error="ec2:DescribeImages: AccessDenied: no")
            if clients.region == "eu-west-1"
            else loaded
        )

    monkeypatch.setattr(inventory, "load_images", eu_unreadable)
    code, output = run("plan", "--config", config, "--region", "us-east-1", "--format", "json")
    plan = json.loads(output)
    assert code == 1 and plan["copies"] == []
    assert plan["regions"] == [
        {"region": "us-east-1", "status": "ok", "error": None},
        {
            "region": "eu-west-1",
            "status": "skipped",
            "error": "copy target not read: ec2:DescribeImages: AccessDenied: no",
        },
    ]
    assert plan["summary"]["regions_skipped"] == 1


@pytest.mark.parametrize("mode", ["dry-run", "enforce"])
def test_rotate_names_the_policy_error_that_leaves_a_family_unrotated_instead_of_calling_it_current(
    endpoint: str, tmp_path: Path, mode: str
) -> None:
    """A family with AMIs of two architectures and one parameter without {arch}: the plan reports a
    policy error and does not rotate it (design.md); `rotate` said every Latest pointer was current."""
    from ami_janitor.demo import emulator

    fleet = seed_fleet(now())
    emulator.set_image_fields("us-east-1", fleet.images[-2], architecture="arm64")
    config = write_policy(tmp_path, mode)  # ssm_parameter "/ami/web/latest"
    [error] = [e for e in json.loads(run("plan", "--config", config, "--format", "json")[1])["policy_errors"]]
    assert "{arch}" in error

    code, output = run("rotate", "--config", config)
    assert code == 0 and f"POLICY ERROR: {error}" in output.splitlines()
    assert "every Latest pointer is current" not in output

    code, output = run("rotate", "--config", config, "--format", "json")
    answer = json.loads(output)
    assert answer["policy_errors"] == [error] and answer["latest"] == [] and answer["rotations"] == []


def test_a_latest_pointer_that_cannot_be_written_keeps_the_ami_it_still_names(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An earlier rotation moved the tag and failed to write the parameter, which launches read: while
    the parameter cannot be written, the AMI it names is kept, though the plan retires it."""

    fleet = seed_fleet(now())
    newest, named = fleet.images[-1], fleet.images[1]  # `named`: older than keep-N, nothing else keeps it
    ssm = boto3.client("ssm", region_name="us-east-1")
    ssm.put_parameter(Name="/ami/web/latest", Value=named, Type="String")
    ec2().create_tags(Resources=[newest], Tags=[{"Key": "Latest", "Value": "true"}])
    make_ledger()
    deny(monkeypatch, "PutParameter")
    code, output = run("apply", "--config", write_policy(tmp_path), "--yes", "--format", "json")

    report = json.loads(output)
    assert code == 1 and [r["status"] for r in report["rotations"]] == ["failed"]
    assert next(d for d in report["decisions"] if d["image_id"] == named)["action"] != "keep"
    assert named in image_ids()
    stages = [r for r in report["results"] if r["image_id"] == named and r["action"] != "mark-candidate"]
    assert stages and {(r["status"], r["detail"]) for r in stages} == {
        ("skipped", "Latest could not be moved away from it")
    }
    assert ssm.get_parameter(Name="/ami/web/latest")["Parameter"]["Value"] == named


@pytest.mark.parametrize("command", ["rotate", "apply"])
def test_a_latest_parameter_that_already_names_the_target_is_not_written_again(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """The Latest tag sits on an older AMI (a hand edit) while the parameter already names the newest:
    the rotation moves the tag and leaves the parameter alone (a PutParameter of the same value would
    make a new version of it, and send its change event, for nothing)."""
    import botocore.client

    fleet = seed_fleet(now())
    newest, older = fleet.images[-1], fleet.images[-2]
    ssm = boto3.client("ssm", region_name="us-east-1")
    ssm.put_parameter(Name="/ami/web/latest", Value=newest, Type="String", DataType="aws:ec2:image")
    ec2().create_tags(Resources=[older], Tags=[{"Key": "Latest", "Value": "true"}])
    make_ledger()
    real_call = botocore.client.BaseClient._make_api_call
    puts: list[dict[str, Any]] = []

    def counted(self: Any, called: str, params: dict[str, Any]) -> Any:
        if called == "PutParameter":
            puts.append(params)
        return real_call(self, called, params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", counted)
    argv = [command, "--config", write_policy(tmp_path)] + (["--yes"] if command == "apply" else [])
    code, output = run(*argv)

    assert code == 0, output
    assert puts == []
    holders = {
        i["ImageId"]
        for i in ec2().describe_images(Filters=[{"Name": "tag:Latest", "Values": ["true"]}])["Images"]
    }
    assert holders == {newest}
    assert ssm.get_parameter(Name="/ami/web/latest")["Parameter"]["Version"] == 1


def test_console_script_plan_json(endpoint: str, tmp_path: Path) -> None:
    seed_fleet(now())
    script = Path(sys.executable).with_name("ami-janitor")
    env = {**os.environ, "AMI_JANITOR_CONFIG": write_policy(tmp_path, "dry-run")}
    done = subprocess.run(
        [str(script), "plan", "--format", "json"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["decisions"]) == 6


def test_bake_creates_a_versioned_image_the_family_selects(endpoint: str, tmp_path: Path) -> None:
    seed_fleet(now())
    make_ledger()
    text = POLICY.format(mode="dry-run") + "    bake: {instance_tag: {Role: web}}\n"
    config = write_policy(tmp_path, text=text)
    client = ec2()
    base = next(
        i["ImageId"] for i in client.describe_images(Owners=["self"])["Images"] if i["Name"] == "base"
    )
    tagged = {"ResourceType": "instance", "Tags": [{"Key": "Role", "Value": "web"}]}
    instance = client.run_instances(ImageId=base, MinCount=1, MaxCount=1, TagSpecifications=[tagged])
    instance_id = instance["Instances"][0]["InstanceId"]
    # bake acts when called, whatever the mode; without --instance-id it finds the tagged instance.
    code, output = run("bake", "--family", "web", "--config", config, "--region", "us-east-1")
    assert code == 0, output
    image_id = output.strip()
    image = client.describe_images(ImageIds=[image_id])["Images"][0]
    tags = {t["Key"]: t["Value"] for t in image["Tags"]}
    assert image["Name"].startswith("web-") and tags["Project"] == "Web"
    assert tags["ami-janitor:baked-from"] == instance_id and tags["Version"] == image["Name"][len("web-") :]
    item = boto3.client("dynamodb", region_name="us-east-1").get_item(
        TableName="ami-janitor-ledger", Key={"pk": {"S": f"image#{image_id}"}, "sk": {"S": "item"}}
    )["Item"]
    assert [b["M"]["instance_id"]["S"] for b in item["bakes"]["L"]] == [instance_id]
    plan = json.loads(run("plan", "--config", config, "--format", "json")[1])
    assert plan["decisions"][0]["image_id"] == image_id  # the newest member of its family
    assert run("bake", "--family", "nope", "--config", config, "--region", "us-east-1")[0] == 2


def test_bake_without_a_ledger_table_is_refused_before_anything_is_made(
    endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_fleet(now())
    launch_build_instance()
    before = image_ids()
    code, output = run("bake", "--family", "web", "--config", bake_policy(tmp_path), "--region", "us-east-1")
    assert (code, output) == (2, "")
    assert "no ledger table ami-janitor-ledger in us-east-1" in capsys.readouterr().err
    assert image_ids() == before


BAKE = '    bake: {{instance_tag: {{Role: web}}, schedule: "cron(0 2 * * ? *)"{pin}}}\n'


def bake_policy(tmp_path: Path, instance_id: str | None = None) -> str:
    pin = f", instance_id: {instance_id}" if instance_id else ""
    return write_policy(tmp_path, text=POLICY.format(mode="dry-run") + BAKE.format(pin=pin))


def launch_build_instance() -> str:
    client = ec2()
    base = next(
        i["ImageId"] for i in client.describe_images(Owners=["self"])["Images"] if i["Name"] == "base"
    )
    tagged = {"ResourceType": "instance", "Tags": [{"Key": "Role", "Value": "web"}]}
    answer = client.run_instances(ImageId=base, MinCount=1, MaxCount=1, TagSpecifications=[tagged])
    return str(answer["Instances"][0]["InstanceId"])


def test_bake_reboots_as_the_familys_bake_no_reboot_says_unless_told(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bake.no_reboot: true`: the command bakes without a reboot, as the scheduled bake does;
    `--reboot` overrides it. (The emulator ignores NoReboot: the value given to the bake is checked;
    tests/unit/test_bake_requests.py checks the CreateImage request it makes.)"""
    from ami_janitor.aws import baker

    seed_fleet(now())
    make_ledger()
    launch_build_instance()
    text = POLICY.format(mode="dry-run") + "    bake: {instance_tag: {Role: web}, no_reboot: true}\n"
    config = write_policy(tmp_path, text=text)
    given: list[bool] = []
    bake = baker.bake

    def recorded(*args: Any, **kwargs: Any) -> Any:
        given.append(kwargs["no_reboot"])
        return bake(*args, **kwargs)

    monkeypatch.setattr(baker, "bake", recorded)
    for flags in ([], ["--reboot"], ["--no-reboot"]):
        code, output = run("bake", "--family", "web", "--config", config, "--region", "us-east-1", *flags)
        assert code == 0, output
    assert given == [True, False, True]
    with pytest.raises(SystemExit):
        run("bake", "--family", "web", "--config", config, "--reboot", "--no-reboot")


def test_bake_refuses_when_several_instances_carry_the_bake_tag(
    endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_fleet(now())
    make_ledger()
    builder, other = launch_build_instance(), launch_build_instance()
    before = image_ids()

    code, output = run("bake", "--family", "web", "--config", bake_policy(tmp_path), "--region", "us-east-1")

    assert code == 1 and output == ""
    err = capsys.readouterr().err
    assert builder in err and other in err and "bake.instance_id or pass --instance-id" in err
    assert image_ids() == before  # no CreateImage
    # Named by hand, or pinned in the policy, the instance is baked.
    code, output = run(
        "bake",
        "--family",
        "web",
        "--config",
        bake_policy(tmp_path),
        "--region",
        "us-east-1",
        "--instance-id",
        builder,
    )
    assert code == 0, output
    code, output = run(
        "bake", "--family", "web", "--config", bake_policy(tmp_path, builder), "--region", "us-east-1"
    )
    assert code == 0, output
    baked = ec2().describe_images(ImageIds=[output.strip()])["Images"][0]
    assert {"Key": "ami-janitor:baked-from", "Value": builder} in baked["Tags"]


def test_bake_that_fails_once_its_image_exists_prints_the_id_as_json_under_format_json(
    endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image of a failed bake exists, so its id is printed (exit 1): bare in a table, but under
    `--format json` stdout is one JSON document that a consumer can parse, never a bare id."""
    from ami_janitor.aws import baker
    from ami_janitor.core import baking

    seed_fleet(now())
    make_ledger()
    image_id = "ami-0123456789abcdef0"

    def image_failed(*args: Any, **kwargs: Any) -> Any:
        # What baker.bake raises when the image it made ends in the `failed` state.
        raise baking.BakeError(f"image {image_id} failed", image_id=image_id)

    monkeypatch.setattr(baker, "bake", image_failed)
    bake = ("bake", "--family", "web", "--instance-id", "i-0123456789abcdef0", "--region", "us-east-1")
    config = bake_policy(tmp_path)

    code, output = run(*bake, "--config", config, "--format", "json")

    assert code == 1
    assert json.loads(output) == {
        "family": "web",
        "image_id": image_id,
        "status": "failed",
        "error": f"image {image_id} failed",
    }
    assert f"bake failed: image {image_id} failed" in capsys.readouterr().err
    assert run(*bake, "--config", config) == (1, f"{image_id}\n")


def test_bake_acts_in_the_region_the_family_bakes_in(
    endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_fleet(now())
    make_ledger()
    builder = launch_build_instance()
    text = POLICY.format(mode="dry-run").replace("regions: [us-east-1]", "regions: [us-east-1, eu-west-1]")
    pinned = f'    bake: {{instance_id: {builder}, regions: [us-east-1], schedule: "cron(0 2 * * ? *)"}}\n'
    config = write_policy(tmp_path, text=text + pinned)
    before = image_ids()

    code, output = run("bake", "--family", "web", "--config", config, "--region", "eu-west-1")

    assert (code, output) == (2, "")
    assert (
        "family web bakes in us-east-1 (bake.regions), not eu-west-1: give --region with one of those, "
        "or --instance-id"
    ) in capsys.readouterr().err
    assert image_ids() == before
    # Without --region, the one region the family bakes in, not the profile's.
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    code, output = run("bake", "--family", "web", "--config", config)
    assert code == 0, output
    baked = ec2().describe_images(ImageIds=[output.strip()])["Images"][0]
    assert {"Key": "ami-janitor:baked-from", "Value": builder} in baked["Tags"]


def test_plan_names_the_instance_a_scheduled_bake_will_image(endpoint: str, tmp_path: Path) -> None:
    seed_fleet(now())
    builder = launch_build_instance()

    code, output = run("plan", "--config", bake_policy(tmp_path), "--format", "json")

    assert code == 0
    assert json.loads(output)["bakes"] == [
        {
            "region": "us-east-1",
            "family": "web",
            "instance_id": builder,
            "reason": "the only instance tagged Role=web",
            "refusal": None,
        }
    ]
    code, output = run("plan", "--config", bake_policy(tmp_path))
    assert (
        f"us-east-1: family web: the scheduled bake will image {builder} (the only instance tagged Role=web)"
        in output
    )

    other = launch_build_instance()
    [bake] = json.loads(run("plan", "--config", bake_policy(tmp_path), "--format", "json")[1])["bakes"]
    assert bake["instance_id"] is None
    assert builder in bake["refusal"] and other in bake["refusal"]
    assert (
        "the scheduled bake would refuse: family web: 2 instances"
        in run("plan", "--config", bake_policy(tmp_path))[1]
    )

    [bake] = json.loads(run("plan", "--config", bake_policy(tmp_path, builder), "--format", "json")[1])[
        "bakes"
    ]
    assert (bake["instance_id"], bake["reason"]) == (builder, "pinned by bake.instance_id")


def test_ledger_create_makes_the_table_once_naming_the_caller(endpoint: str, tmp_path: Path) -> None:
    config = write_policy(tmp_path, "dry-run")
    code, output = run("ledger", "create", "--config", config)
    assert code == 0, output
    assert output.startswith("us-east-1: created ami-janitor-ledger (")
    # moto's GetCallerIdentity answers as a user (arn:aws:sts::...:user/moto): named as it is.
    assert "writers besides roles under /ami-janitor/: arn:aws:sts::123456789012:user/moto" in output
    code, output = run("ledger", "create", "--config", config, "--format", "json")
    assert code == 0
    [result] = json.loads(output)
    assert result["created"] is False and result["changes"] == []
    code, output = run(
        "ledger", "create", "--config", config, "--writer", "arn:aws:iam::123456789012:role/ops"
    )
    assert code == 0 and output.startswith("us-east-1: adopted ami-janitor-ledger (wrote the resource policy")


def test_role_arn_makes_every_call_as_the_operator_role(endpoint: str, tmp_path: Path) -> None:
    role = "arn:aws:iam::123456789012:role/ami-janitor/ami-janitor-operator"
    config = write_policy(tmp_path, "dry-run")
    code, output = run("ledger", "create", "--config", config, "--role-arn", role)
    assert code == 0, output
    # The caller is the assumed role: the table's policy names that role (whatever its path).
    assert "arn:aws:iam::123456789012:role/ami-janitor-operator" in output
    assert "user/moto" not in output


def test_apply_without_a_ledger_exits_2_before_writing_and_plan_says_so(
    endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = seed_fleet(now())
    config = write_policy(tmp_path)
    code, output = run("plan", "--config", config, "--format", "json")
    assert code == 0
    note = "no ledger table ami-janitor-ledger in us-east-1: plan only; `ami-janitor ledger create` makes it"
    assert note in json.loads(output)["notes"]
    assert run("apply", "--config", config, "--yes")[0] == 2
    err = capsys.readouterr().err
    assert "no ledger table ami-janitor-ledger in us-east-1" in err and "ami-janitor ledger create" in err
    assert image_ids() >= set(fleet.images)
    assert "Latest" not in {
        t["Key"] for t in ec2().describe_images(ImageIds=[fleet.images[-1]])["Images"][0].get("Tags", [])
    }
    assert run("ledger", "create", "--config", config)[0] == 0
    code, output = run("plan", "--config", config, "--format", "json")
    assert not any("ledger" in n for n in json.loads(output)["notes"])
    assert run("apply", "--config", config, "--yes")[0] == 0


def test_apply_of_a_region_whose_copy_target_has_no_ledger_exits_2_before_writing(
    endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The copies an apply of us-east-1 makes are recorded in eu-west-1's ledger: with no table there, the
    apply is refused before anything is written (as `replicate` is), and the plan says so."""
    fleet = seed_fleet(now())
    make_ledger(("us-east-1",))
    text = POLICY.format(mode="enforce") + "    replicate: [{region: eu-west-1}]\n"
    config = write_policy(tmp_path, text=text)
    code, output = run("plan", "--config", config, "--region", "us-east-1", "--format", "json")
    note = "no ledger table ami-janitor-ledger in eu-west-1: plan only; `ami-janitor ledger create` makes it"
    assert code == 0 and note in json.loads(output)["notes"]
    capsys.readouterr()

    assert run("apply", "--config", config, "--region", "us-east-1", "--yes")[0] == 2
    err = capsys.readouterr().err
    assert "no ledger table ami-janitor-ledger in eu-west-1" in err and "ami-janitor ledger create" in err
    assert image_ids() >= set(fleet.images)


def test_a_ledger_that_cannot_be_checked_is_not_said_to_be_missing(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DescribeTable refused: the table may be there, so the plan's note gives the error without the
    advice to make it (which `ledger create` would answer with an error of its own)."""
    seed_fleet(now())
    make_ledger()
    config = write_policy(tmp_path)
    deny(monkeypatch, "DescribeTable")

    code, output = run("plan", "--config", config, "--format", "json")

    assert code == 0  # a plan does not need the table
    [note] = [n for n in json.loads(output)["notes"] if "ledger" in n]
    assert note.startswith("cannot check the ledger table ami-janitor-ledger in us-east-1 (")
    assert note.endswith(
        "AccessDeniedException) when calling the DescribeTable operation: denied): plan only"
    )


def test_ledger_create_exits_1_where_a_region_fails(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", "http://127.0.0.1:9")
    code, output = run("ledger", "create", "--config", write_policy(tmp_path, "dry-run"))
    assert code == 1 and output == ""
    assert "ledger create failed in us-east-1:" in capsys.readouterr().err


def test_paused_stops_rescue_and_bake_and_plan_still_reads(
    endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = seed_fleet(now())
    make_ledger()
    config = write_policy(tmp_path, "paused")
    ec2().disable_image(ImageId=fleet.images[0])
    assert run("rescue", fleet.images[0], "--config", config)[0] == 2
    assert "mode is paused" in capsys.readouterr().err
    assert run("bake", "--family", "web", "--region", "us-east-1", "--config", config)[0] == 2
    assert "set mode: dry-run to rescue or bake by hand" in capsys.readouterr().err
    assert ec2().describe_images(ImageIds=[fleet.images[0]])["Images"][0]["State"] == "disabled"
    code, output = run("plan", "--config", config, "--format", "json")
    assert code == 0 and "mode is paused: nothing is applied" in json.loads(output)["notes"]


def test_paused_rotate_and_replicate_write_nothing(endpoint: str, tmp_path: Path) -> None:
    """The kill switch holds for the commands that reconcile by hand too: they only say what they
    would do."""
    fleet = seed_fleet(now())
    make_ledger()
    config = write_policy(tmp_path, "paused")
    code, output = run("rotate", "--config", config)
    assert code == 0 and fleet.images[-1] in output
    assert run("replicate", "--config", config)[0] == 0
    tagged = ec2().describe_images(Filters=[{"Name": "tag:Latest", "Values": ["true"]}])["Images"]
    assert tagged == []
    assert boto3.client("ssm", region_name="us-east-1").describe_parameters()["Parameters"] == []


class ClosedPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_stdout_ends_quietly(endpoint: str, tmp_path: Path) -> None:
    seed_fleet(now())
    config = write_policy(tmp_path, "dry-run")
    assert cli.main(["plan", "--config", config], out=ClosedPipe()) == 0


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("ami-janitor ")


def test_the_emulator_command_serves_the_demo_account_and_says_how_to_use_it(
    endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    import time

    monkeypatch.delenv("AMI_JANITOR_CONFIG", raising=False)  # restored after: the command sets it
    out = io.StringIO()
    done: list[int] = []
    thread = threading.Thread(
        target=lambda: done.append(cli.main(["emulator", "--exit-after", "60"], out=out)), daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 60
    while "AMI_JANITOR_CONFIG=" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.2)
    text = out.getvalue()
    served = text.split("export AWS_ENDPOINT_URL=")[1].split()[0]
    assert "AMI_JANITOR_MAX_ATTEMPTS=1" in text and "ami-janitor ledger create && ami-janitor plan" in text
    client = boto3.client("ec2", region_name="us-east-1", endpoint_url=served)
    assert len(client.describe_images(Owners=["self"])["Images"]) > 50  # the PetTracker account
    config = text.split("export AMI_JANITOR_CONFIG=")[1].split()[0]
    monkeypatch.setenv("AWS_ENDPOINT_URL", served)
    code, output = run("plan", "--config", config, "--format", "json")
    plan = json.loads(output)
    assert code == 0 and plan["summary"]["images"] > 50
    # The policy's replica key and build instance are there: `replicate` and `bake` work as written.
    assert not [note for note in plan["notes"] if "cannot resolve" in note], plan["notes"]
    assert {copy["region"] for copy in plan["copies"]} == {"eu-west-1"}
    assert run("ledger", "create", "--config", config)[0] == 0
    code, output = run("bake", "--family", "pettracker-api", "--config", config, "--no-wait")
    assert code == 0 and output.startswith("ami-"), output


@pytest.mark.parametrize("port", ["-5", "99999", "in-use"])
def test_the_emulator_refuses_a_port_it_cannot_listen_on_with_exit_2(port: str) -> None:
    """Bad input is exit 2 with one line naming it, before any export line: not a thread traceback
    and a process that never ends (-5, or a port another program holds), nor a server on another
    port than the one asked for (the socket layer takes 99999 as 34463)."""
    import socket

    held = socket.socket()
    if port == "in-use":
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
    script = Path(sys.executable).with_name("ami-janitor")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    try:
        done = subprocess.run(
            [str(script), "emulator", "--port", port, "--exit-after", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        held.close()
    assert done.returncode == 2, (done.returncode, done.stdout[:300], done.stderr[-400:])
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    said = done.stderr.splitlines()[-1]  # argparse's or the command's own line
    assert "--port" in said and port in said, done.stderr


@pytest.mark.parametrize("stop", ["kill", "exit-after"])
def test_the_emulator_removes_the_directory_of_its_policy_when_it_stops(stop: str) -> None:
    """The policy it writes points at a server that is gone once it stops: stopped by `kill` (SIGTERM,
    as a test harness or a process manager stops it) or by `--exit-after`, it leaves nothing behind."""
    import signal

    script = Path(sys.executable).with_name("ami-janitor")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    after = "60" if stop == "kill" else "3"
    with subprocess.Popen(
        [str(script), "emulator", "--empty", "--exit-after", after],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    ) as server:
        assert server.stdout is not None
        config = None
        for line in server.stdout:
            if line.startswith("export AMI_JANITOR_CONFIG="):
                config = Path(line.split("=", 1)[1].strip())
                break
        assert config is not None and config.is_file()
        if stop == "kill":
            server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    assert not config.parent.exists()


def test_progress_lines_on_a_terminal_only(
    endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_fleet(now())
    make_ledger()
    config = write_policy(tmp_path)
    owned = len(image_ids())
    # A pipe or a file: stderr stays empty, so scripts and `2>` captures see only errors.
    assert run("plan", "--config", config, "--format", "json")[0] == 0
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, output = run("apply", "--config", config, "--yes", "--format", "json")
    assert code == 0
    json.loads(output)  # progress never mixes into the JSON on stdout
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "... us-east-1: reading"
    assert lines[1].startswith(f"... us-east-1: {owned} AMIs read in ")
    assert lines[-2] == "... applying the plan in us-east-1"
    assert re.fullmatch(r"\.\.\. us-east-1: slice 1 of 1 \(\d+ AMIs\)", lines[-1]), lines


def html_page_to(monkeypatch: pytest.MonkeyPatch, operation: str) -> None:
    """`operation` is answered with an HTML 500 page, which botocore cannot parse."""
    import botocore.client
    import botocore.parsers

    real_call = botocore.client.BaseClient._make_api_call

    def answer(self: Any, called: str, params: dict[str, Any]) -> Any:
        if called == operation:
            raise botocore.parsers.ResponseParserError(
                "Unable to parse response (not well-formed (invalid token): line 1, column 0), "
                "invalid XML received. Further retries may succeed:\nb'<!doctype html>'"
            )
        return real_call(self, called, params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", answer)


def test_an_unreadable_answer_to_bake_is_one_line_and_exit_1(
    endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_fleet(now())
    make_ledger()
    config = write_policy(
        tmp_path, text=POLICY.format(mode="dry-run") + "    bake: {instance_tag: {Role: web}}\n"
    )
    client = ec2()
    base = next(
        i["ImageId"] for i in client.describe_images(Owners=["self"])["Images"] if i["Name"] == "base"
    )
    tagged = {"ResourceType": "instance", "Tags": [{"Key": "Role", "Value": "web"}]}
    client.run_instances(ImageId=base, MinCount=1, MaxCount=1, TagSpecifications=[tagged])
    html_page_to(monkeypatch, "CreateImage")

    code, output = run("bake", "--family", "web", "--config", config, "--region", "us-east-1")

    err = capsys.readouterr().err
    assert code == 1, output + err
    assert "Traceback" not in output + err
    assert len((output + err).strip().splitlines()) == 1 and "Unable to parse response" in output + err


def test_an_unreadable_answer_mid_apply_ends_with_the_summary_of_what_was_done(
    endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint answering an HTML 500 page to a stage call (botocore cannot parse it): the Latest
    writes and the other results are still reported, with the failure in one line, exit 1."""
    fleet = seed_fleet(now())
    make_ledger()
    html_page_to(monkeypatch, "EnableImageDeprecation")

    code, output = run("apply", "--config", write_policy(tmp_path), "--yes")

    assert code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in output + err
    assert f"-> {fleet.images[-1]}" in output  # Latest moved before any stage
    failed = [line for line in output.splitlines() if line.startswith("deprecate ")]
    assert len(failed) == 3, output
    assert all("FAILED Unable to parse response" in line and "<!doctype html>" in line for line in failed)
    assert "applied: 12 actions, 3 failed" in output
    assert image_ids() >= set(fleet.images)  # nothing retired past the stage that failed


def test_role_arn_exact_assume_role_request(fake_aws_env: None) -> None:
    """`--role-arn`: one AssumeRole, exactly these parameters, and a session holding its credentials."""
    from botocore.stub import Stubber

    from ami_janitor.aws.clients import OPERATOR_SESSION_NAME, assumed_session

    role = "arn:aws:iam::123456789012:role/ami-janitor/ami-janitor-operator"
    sts = boto3.Session(region_name="eu-west-1").client("sts")
    expiry = "2030-01-01T00:00:00Z"
    credentials = {
        "AccessKeyId": "ASIAOPERATOREXAMPLE",
        "SecretAccessKey": "s3cr3t",
        "SessionToken": "tok",
        "Expiration": expiry,
    }

    class Base:
        def get_config_variable(self, name: str) -> str:
            assert name == "region"
            return "eu-west-1"

        def create_client(self, service: str, **_: Any) -> Any:
            assert service == "sts"
            return sts

    with Stubber(sts) as stub:
        stub.add_response(
            "assume_role",
            {"Credentials": credentials},
            {"RoleArn": role, "RoleSessionName": OPERATOR_SESSION_NAME, "DurationSeconds": 3600},
        )
        session = assumed_session(Base(), role)  # type: ignore[arg-type]
        stub.assert_no_pending_responses()

    frozen = session.get_credentials().get_frozen_credentials()
    assert (frozen.access_key, frozen.secret_key, frozen.token) == ("ASIAOPERATOREXAMPLE", "s3cr3t", "tok")
    assert session.get_config_variable("region") == "eu-west-1"
    assert OPERATOR_SESSION_NAME == "ami-janitor-cli"


def test_role_arn_credentials_are_assumed_again_before_they_expire(fake_aws_env: None) -> None:
    """An apply may outlast the assumed role's hour: credentials about to expire are replaced by a new
    AssumeRole (the same request) before a call is signed with them."""
    from datetime import UTC, datetime, timedelta

    from botocore.stub import Stubber

    from ami_janitor.aws.clients import OPERATOR_SESSION_NAME, assumed_session

    role = "arn:aws:iam::123456789012:role/ami-janitor/ami-janitor-operator"
    sts = boto3.Session(region_name="eu-west-1").client("sts")
    request = {"RoleArn": role, "RoleSessionName": OPERATOR_SESSION_NAME, "DurationSeconds": 3600}

    def answer(key: str, expires_in: timedelta) -> dict[str, Any]:
        expiry = datetime.now(UTC) + expires_in
        return {
            "Credentials": {
                "AccessKeyId": key,
                "SecretAccessKey": "s",
                "SessionToken": "t",
                "Expiration": expiry,
            }
        }

    class Base:
        def get_config_variable(self, name: str) -> str:
            return "eu-west-1"

        def create_client(self, service: str, **_: Any) -> Any:
            return sts

    with Stubber(sts) as stub:
        stub.add_response("assume_role", answer("ASIAFIRSTEXAMPLE1", timedelta(minutes=5)), request)
        stub.add_response("assume_role", answer("ASIASECONDEXAMPLE", timedelta(hours=1)), request)
        session = assumed_session(Base(), role)  # type: ignore[arg-type]
        # Five minutes left: inside botocore's refresh window, so the next use assumes the role again.
        assert session.get_credentials().get_frozen_credentials().access_key == "ASIASECONDEXAMPLE"
        stub.assert_no_pending_responses()
