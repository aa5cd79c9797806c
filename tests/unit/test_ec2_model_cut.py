"""The EC2 model the janitor's sessions load (aws/models): botocore's own, cut to the operations the
package calls, and nothing it calls left out."""

from __future__ import annotations

import json
import re
from pathlib import Path

import botocore.loaders
import botocore.session
import pytest
from botocore import xform_name

from ami_janitor.aws import models
from ami_janitor.aws.clients import ClientFactory, janitor_session
from ami_janitor.aws.models.trim import trimmed

PACKAGE = Path(models.__file__).resolve().parents[2]


def botocore_ec2() -> dict:
    loader = botocore.loaders.Loader(
        extra_search_paths=[botocore.loaders.Loader.BUILTIN_DATA_PATH], include_default_search_paths=False
    )
    return loader.load_service_model("ec2", "service-2", models.EC2_API_VERSION)


def test_the_shipped_cut_is_botocores_model_cut_again() -> None:
    # Fails after a botocore upgrade: `python -m ami_janitor.aws.models` writes it again.
    shipped = json.loads(models.EC2_MODEL.read_text())
    assert shipped == trimmed(botocore_ec2(), models.EC2_OPERATIONS)
    assert sorted(shipped["operations"]) == sorted(models.EC2_OPERATIONS)


def test_every_ec2_operation_the_package_names_is_in_the_cut() -> None:
    """An operation named anywhere the functions and the CLI run (a client method, a paginator's name,
    an IAM action) is in the cut; the demo drives moto with clients of its own."""
    full = botocore_ec2()
    by_name = {xform_name(op): op for op in full["operations"]} | {op: op for op in full["operations"]}
    named = set()
    for source in PACKAGE.rglob("*.py"):
        if "demo" in source.relative_to(PACKAGE).parts:
            continue
        text = source.read_text()
        named |= {by_name[word] for word in re.findall(r"\w+", text) if word in by_name}
        named |= {action for action in re.findall(r"\bec2:(\w+)", text) if action in full["operations"]}
    assert "DescribeImageAttribute" in named and "DeregisterImage" in named  # the scan finds calls
    assert named <= set(models.EC2_OPERATIONS), sorted(named - set(models.EC2_OPERATIONS))


def test_the_cut_keeps_every_shape_its_operations_reach() -> None:
    cut = json.loads(models.EC2_MODEL.read_text())
    model = botocore.model.ServiceModel(cut, "ec2")
    for name in model.operation_names:
        operation = model.operation_model(name)
        for shape in (operation.input_shape, operation.output_shape, *operation.error_shapes):
            if shape is not None:
                _walk(shape)
    full = botocore_ec2()
    for name, shape in cut["shapes"].items():
        assert {k: v for k, v in full["shapes"][name].items() if k != "documentation"}.keys() == shape.keys()


def _walk(shape: botocore.model.Shape, seen: set[str] | None = None) -> None:
    seen = set() if seen is None else seen
    if shape.name in seen:
        return
    seen.add(shape.name)
    for child in getattr(shape, "members", {}).values():
        _walk(child, seen)
    for part in ("member", "key", "value"):
        if hasattr(shape, part):
            _walk(getattr(shape, part), seen)


def test_the_janitors_clients_load_the_cut_and_a_users_models_come_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    ec2 = ClientFactory(janitor_session())("us-east-1").ec2
    assert sorted(ec2.meta.service_model.operation_names) == sorted(models.EC2_OPERATIONS)
    assert ec2.can_paginate("describe_images")  # paginators still come from botocore
    # A model of the user's (AWS_DATA_PATH, ~/.aws/models) is found before the cut, as before botocore's.
    own = tmp_path / "ec2" / models.EC2_API_VERSION
    own.mkdir(parents=True)
    (own / "service-2.json").write_text(json.dumps(botocore_ec2()))
    monkeypatch.setenv("AWS_DATA_PATH", str(tmp_path))
    paths = janitor_session()._session.get_component("data_loader").search_paths
    assert paths.index(str(tmp_path)) < paths.index(str(models.DATA_PATH))
    assert paths.index(str(models.DATA_PATH)) < paths.index(botocore.loaders.Loader.BUILTIN_DATA_PATH)
    assert (
        len(janitor_session().client("ec2", region_name="us-east-1").meta.service_model.operation_names) > 800
    )
