"""`ami-janitor demo` from a fresh process: the whole story, no AWS account."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path


def test_demo_keeps_every_ami_in_use_and_retires_the_rest() -> None:
    script = Path(sys.executable).with_name("ami-janitor")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    done = subprocess.run([str(script), "demo"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "Traceback" not in out + done.stderr
    # The plan shows why each in-use AMI is kept (its table wraps the reasons to 120 columns).
    flowing = " ".join(out.split())
    for reason in (
        "(stopped)",
        "(pettracker-web) version 1",
        "resolves resolve:ssm:/pettracker/api/pinned to it",
        "value of SSM parameter /pettracker/ml/rollback-ami",
        "opted out (tag ami-janitor:keep)",
        "deregistration protection is on",
        "shared with user:999988887777 (not in share_with)",
    ):
        assert reason in flowing, reason
    # pettracker-api is retired with its snapshots; pettracker-ml enters the staged path.
    assert len(re.findall(r"^deregister us-east-1 ami-\w+: ok \(snapshots deleted: snap-", out, re.M)) == 6
    assert re.search(r"pettracker-ml: \d+ clocks started, \d+ deprecated", out)
    assert "next stage disable at" in out
    assert (
        "The cleanup run: AMIs 192 -> 188 (6 retired, 2 copies made in eu-west-1; the bakes and copies "
        "since are not counted); snapshots deleted: 6"
    ) in out
    assert "Checked: all 7 referenced, opted-out, protected or foreign-shared AMIs are available." in out
    # Latest follows tonight's bake through its event, ignores a late one, and reconcile repairs a hand edit.
    new = re.search(r"Tonight's bake (ami-\w+) becomes available", out)
    assert new is not None
    assert f"event handler: rotated; Latest tag on {new.group(1)}; parameter {new.group(1)}" in out
    assert "0 writes; Latest still" in out
    # The bake already carries the tag: the stale holder is untagged and the parameter written (2 writes).
    assert f"reconcile (2 writes): tag on {new.group(1)}; parameter {new.group(1)}\n" in out
    # Bake -> available -> shared -> copied (encrypted where asked) -> Latest in the second region.
    baked = re.search(r"ami-janitor bake --family pettracker-api: (ami-\w+)", out)
    assert baked is not None
    assert f"/ami/pettracker-api/latest -> {baked.group(1)}; shared with 111122223333; 1 copy queued" in out
    copy = re.search(
        rf"copied it to eu-west-1: (ami-\w+) \(KMS key requested; source-image {baked.group(1)}", out
    )
    assert copy is not None
    assert f"in eu-west-1: /ami/pettracker-api/latest -> {copy.group(1)}" in out
    # The policy names the key by alias: resolved in eu-west-1, the key ARN is what the copies got.
    key = re.search(
        r"Replica key in eu-west-1: alias/pettracker-key -> (arn:aws:kms:eu-west-1:\d{12}:key/[\w-]+)", out
    )
    assert key is not None
    assert f"(KMS alias/pettracker-key = {key.group(1)})" in out
    assert (
        f"encrypted with alias/pettracker-key, resolved in eu-west-1 to {key.group(1)}: CopyImage got" in out
    )
    assert "the same message delivered again: 1 copy in eu-west-1, 0 failed messages" in out
    # The policy it wrote for the emulator is gone with it.
    written = re.search(r"^Embedded AWS \(moto\) on \S+; policy (\S+)$", out, re.M)
    assert written is not None and not Path(written.group(1)).parent.exists()


def test_demo_format_json_prints_one_json_document() -> None:
    """`demo --format json` is for a program to read: stdout is one JSON document, without the EMF
    metric lines the AMI event handler it calls in-process prints (Powertools' single_metric)."""
    script = Path(sys.executable).with_name("ami-janitor")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    done = subprocess.run(
        [str(script), "demo", "--format", "json"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    try:
        document = json.loads(done.stdout)
    except json.JSONDecodeError as error:
        after = done.stdout[error.pos : error.pos + 300]
        raise AssertionError(f"stdout is not one JSON document: {error}; after it: {after!r}") from None
    assert document["decisions"], done.stdout[:300]  # the plan
    assert "Done in " in done.stderr  # the story went to stderr


def test_a_demo_stopped_by_kill_removes_its_policy_and_says_it_was_interrupted() -> None:
    import signal

    script = Path(sys.executable).with_name("ami-janitor")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with subprocess.Popen(
        [str(script), "demo"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as demo:
        assert demo.stdout is not None and demo.stderr is not None
        first = demo.stdout.readline()
        written = re.search(r"^Embedded AWS \(moto\) on \S+; policy (\S+)$", first)
        assert written is not None, first
        policy = Path(written.group(1))
        assert policy.is_file()
        demo.send_signal(signal.SIGTERM)
        code = demo.wait(timeout=60)
        said = demo.stderr.read()
    assert code == 130 and "interrupted" in said, said[-2000:]
    assert "Traceback" not in said
    assert not policy.parent.exists()
