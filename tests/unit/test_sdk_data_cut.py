"""The SDK data the janitor's sessions load (aws/models): botocore's own, cut to the operations and
services the package calls, nothing it calls left out, and every endpoint as botocore resolves it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import botocore.compat
import botocore.exceptions
import botocore.handlers
import botocore.hooks
import botocore.loaders
import botocore.model
import botocore.session
import pytest
from botocore import xform_name

from ami_janitor.aws import models
from ami_janitor.aws.clients import (
    ClientFactory,
    QuickAliaser,
    aliased_event,
    janitor_handlers,
    janitor_session,
    known_regions,
)
from ami_janitor.aws.models.__main__ import botocore_loader
from ami_janitor.aws.models.trim import endpoints_of, trimmed
from sessions import botocore_session

PACKAGE = Path(models.__file__).resolve().parents[2]
CUT = sorted(models.OPERATIONS)


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_DATA_PATH", raising=False)


def botocore_model(service: str) -> dict:
    return botocore_loader().load_service_model(service, "service-2")


def shipped_model(service: str) -> dict:
    (path,) = (models.DATA_PATH / service).glob("*/service-2.json")
    return json.loads(path.read_text())


@pytest.mark.parametrize("service", CUT)
def test_each_shipped_cut_is_botocores_model_cut_again(service: str) -> None:
    # Fails after a botocore upgrade: `python -m ami_janitor.aws.models` writes them again.
    shipped = shipped_model(service)
    assert shipped == trimmed(botocore_model(service), models.OPERATIONS[service])
    assert sorted(shipped["operations"]) == sorted(models.OPERATIONS[service])


def test_the_shipped_endpoints_are_botocores_cut_again() -> None:
    shipped = json.loads(models.ENDPOINTS.read_text())
    assert shipped == endpoints_of(botocore_loader().load_data("endpoints"), models.SERVICES)
    assert {p["partition"] for p in shipped["partitions"]} >= {"aws", "aws-cn", "aws-us-gov", "aws-iso"}


def _package_sources() -> list[str]:
    """Where the functions and the CLI run: the demo drives moto with clients of its own."""
    return [
        source.read_text()
        for source in PACKAGE.rglob("*.py")
        if "demo" not in source.relative_to(PACKAGE).parts
    ]


@pytest.mark.parametrize("service", CUT)
def test_every_operation_the_package_names_is_in_the_cut(service: str) -> None:
    """An operation named anywhere (a client method, a paginator's name, an IAM action, a waiter's
    operation) is in the cut."""
    full = botocore_model(service)
    by_name = {xform_name(op): op for op in full["operations"]} | {op: op for op in full["operations"]}
    try:
        waiters = botocore_loader().load_service_model(service, "waiters-2")["waiters"]
    except botocore.exceptions.DataNotFoundError:
        waiters = {}
    by_waiter = {xform_name(name): waiter["operation"] for name, waiter in waiters.items()}
    named = set()
    for text in _package_sources():
        named |= {by_name[word] for word in re.findall(r"\w+", text) if word in by_name}
        named |= {op for op in re.findall(rf"\b{service}:(\w+)", text) if op in full["operations"]}
        named |= {by_waiter[w] for w in re.findall(r"get_waiter\(\"(\w+)\"\)", text) if w in by_waiter}
    assert named <= set(models.OPERATIONS[service]), sorted(named - set(models.OPERATIONS[service]))


def test_the_scan_finds_calls() -> None:
    # The test above would pass on a scan that finds nothing: it finds these.
    text = "\n".join(_package_sources())
    assert "describe_image_attribute" in text and "deregister_image" in text and "get_waiter(" in text


@pytest.mark.parametrize("service", CUT)
def test_the_cut_keeps_every_shape_its_operations_reach(service: str) -> None:
    cut = shipped_model(service)
    model = botocore.model.ServiceModel(cut, service)
    for name in model.operation_names:
        operation = model.operation_model(name)
        for shape in (operation.input_shape, operation.output_shape, *operation.error_shapes):
            if shape is not None:
                _walk(shape)
    full = botocore_model(service)
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


def test_the_janitors_clients_load_the_cut() -> None:
    clients = ClientFactory(janitor_session())("us-east-1")
    assert sorted(clients.ec2.meta.service_model.operation_names) == sorted(models.OPERATIONS["ec2"])
    assert sorted(clients.dynamodb.meta.service_model.operation_names) == sorted(
        models.OPERATIONS["dynamodb"]
    )
    assert clients.ec2.can_paginate("describe_images")  # paginators still come from botocore
    assert clients.dynamodb.get_waiter("table_exists").name == "TableExists"  # and waiters
    assert len(clients.s3.meta.service_model.operation_names) > 100  # S3 whole


def test_the_loader_looks_only_for_the_janitors_services() -> None:
    loader = janitor_session().get_component("data_loader")
    assert loader.list_available_services("service-2") == list(models.SERVICES)
    assert "rbin" not in loader.list_available_services("waiters-2")  # a type a service lacks
    assert "ec2" in loader.list_available_services("waiters-2")


def test_a_services_model_is_looked_for_in_that_services_directories_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """botocore lists every service's directories, in every search path, before it loads one model of
    each type: a client's first call looked at all 17 janitor services' directories three times over."""
    loader = janitor_session().get_component("data_loader")
    listed: list[str] = []
    listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda path=".": listed.append(str(path)) or listdir(path))
    for type_name in ("service-2", "endpoint-rule-set-1", "paginators-1"):
        loader.load_service_model("ec2", type_name)
    assert listed and {Path(path).name for path in listed} == {"ec2"}


def test_a_type_a_service_lacks_fails_as_in_botocores_loader() -> None:
    ours = janitor_session().get_component("data_loader")
    theirs = botocore.loaders.Loader(extra_search_paths=[str(models.DATA_PATH)])
    for loader in (ours, theirs):
        with pytest.raises(botocore.exceptions.UnknownServiceError, match="rbin"):
            loader.load_service_model("rbin", "waiters-2")
        with pytest.raises(botocore.exceptions.DataNotFoundError):
            loader.load_service_model("ec2", "service-2", "2001-01-01")  # no such version
    with pytest.raises(botocore.exceptions.UnknownServiceError, match="glacier"):
        ours.load_service_model("glacier", "service-2")  # not a janitor service


@pytest.mark.parametrize(
    "region", ["us-east-1", "eu-west-1", "ap-southeast-7", "cn-north-1", "us-gov-west-1", "us-iso-east-1"]
)
def test_every_client_reaches_the_endpoint_botocores_own_data_gives(region: str) -> None:
    janitor, stock = janitor_session(), botocore_session()
    for service in models.SERVICES:
        ours = janitor.create_client(service, region_name=region)
        theirs = stock.create_client(service, region_name=region)
        assert ours.meta.endpoint_url == theirs.meta.endpoint_url, service
        assert ours.meta.region_name == theirs.meta.region_name, service


def test_the_known_regions_are_botocores() -> None:
    assert known_regions(janitor_session()) == known_regions(botocore_session())
    assert {"us-east-1", "cn-north-1", "us-gov-west-1"} <= known_regions(janitor_session())


def test_a_users_models_come_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A model of the user's (AWS_DATA_PATH, ~/.aws/models) is found before the cut, as before botocore's.
    version = botocore_loader().determine_latest_version("ec2", "service-2")
    own = tmp_path / "ec2" / version
    own.mkdir(parents=True)
    (own / "service-2.json").write_text(json.dumps(botocore_model("ec2")))
    monkeypatch.setenv("AWS_DATA_PATH", str(tmp_path))
    paths = janitor_session().get_component("data_loader").search_paths
    assert paths.index(str(tmp_path)) < paths.index(str(models.DATA_PATH))
    assert paths.index(str(models.DATA_PATH)) < paths.index(botocore.loaders.Loader.BUILTIN_DATA_PATH)
    assert (
        len(
            janitor_session().create_client("ec2", region_name="us-east-1").meta.service_model.operation_names
        )
        > 800
    )


def _handlers_called(session: botocore.session.Session, event_name: str) -> list[str]:
    """The handlers the session's emitter would call for `event_name`, in order, by name (botocore's own
    trie: emitting would run them; a library's initializer makes its handler anew for each session)."""
    events = session.get_component("event_emitter")
    found = events._emitter._handlers.prefix_search(events._alias_event_name(event_name))
    return [getattr(handler, "__qualname__", type(handler).__qualname__) for handler in found]


@pytest.mark.parametrize("service", models.SERVICES)
def test_a_janitor_sessions_clients_call_the_handlers_botocores_would(service: str) -> None:
    """A janitor session registers only the built-in handlers its services' clients can call: for every
    kind of event botocore has a handler for, of the service, of each of its operations (and each
    method name), the handlers called are botocore's, in botocore's order."""
    janitor, stock = janitor_session(), botocore_session()
    model = stock.get_service_model(service)
    kinds = {spec[0].split(".")[0] for spec in botocore.handlers.BUILTIN_HANDLERS} - {"docs"}
    names = [model.service_id.hyphenize(), service]
    operations = [*model.operation_names, *map(xform_name, model.operation_names)]
    events = [
        *kinds,
        *(f"{kind}.{name}" for kind in kinds for name in names),
        *(f"{kind}.{name}.{op}" for kind in kinds for name in names for op in operations),
    ]
    called = 0
    for event in events:
        theirs = _handlers_called(stock, event)
        assert _handlers_called(janitor, event) == theirs, event
        called += len(theirs)
    assert called > 0


def test_a_janitor_session_leaves_out_only_documentation_and_other_services() -> None:
    left_out = [spec[0] for spec in botocore.handlers.BUILTIN_HANDLERS if spec not in janitor_handlers()]
    assert any(name.startswith("docs.") for name in left_out)
    assert any(name.startswith("before-call.glacier") for name in left_out)
    for name in left_out:
        service = name.split(".")[1]
        assert name.startswith("docs.") or service not in {*models.SERVICES, "auto-scaling"}, name
    kept = [spec[0] for spec in janitor_handlers()]
    assert "before-parameter-build.s3.PutObject" in kept and "before-parameter-build" in kept
    aliaser = botocore.hooks.EventAliaser(botocore.hooks.HierarchicalEmitter())
    assert [aliased_event(name) for name in kept] == [aliaser._alias_event_name(name) for name in kept]
    assert aliased_event("before-parameter-build.autoscaling.CreateLaunchConfiguration").split(".")[1] == (
        "auto-scaling"
    )


@pytest.mark.parametrize(
    "event_name",
    [
        "before-call.autoscaling.DescribeAutoScalingGroups",
        "before-call.data.iot.Publish",
        "before-call.metadata.iotx.Get",
        "before-call.streams.dynamodb.GetRecords",
        "before-call.ec2.DescribeImages",
    ],
)
def test_the_quick_aliaser_answers_named_events_as_botocores(event_name: str) -> None:
    theirs = botocore.hooks.EventAliaser(botocore.hooks.HierarchicalEmitter())
    assert QuickAliaser(botocore.hooks.HierarchicalEmitter())._alias_event_name(event_name) == (
        theirs._alias_event_name(event_name)
    )


def test_every_handler_a_janitor_session_registers_takes_keyword_arguments() -> None:
    """The session registers botocore's handlers without botocore's check of each one's signature:
    each passes it (a handler that did not would fail at its first event)."""
    for event_name, handler, *_ in janitor_handlers():
        assert callable(handler), event_name
        assert botocore.compat.accepts_kwargs(handler), event_name


def test_a_janitor_sessions_clients_alias_their_events_quickly() -> None:
    """Each client copies the session's emitter: the quick aliaser, over the session's handlers (an
    `autoscaling` event still reaches the handlers registered under `auto-scaling`)."""
    session = janitor_session()
    client = session.create_client("autoscaling", region_name="us-east-1")
    events = client.meta.events
    assert type(events) is QuickAliaser
    name = events._alias_event_name("before-parameter-build.autoscaling.CreateLaunchConfiguration")
    called = [handler.__qualname__ for handler in events._emitter._handlers.prefix_search(name)]
    assert "base64_encode_user_data" in called, called


@pytest.mark.parametrize(
    "event_name", ["before-call.elasticmapreduce.ListClusters", "before-call.autoscaling", "after-call.emr"]
)
def test_a_handler_named_with_an_older_name_of_a_janitor_service_is_kept(
    event_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later botocore may name a handler's service the old way (EMR's `elasticmapreduce`): kept, and
    registered under the name its aliaser gives it."""

    def handler(**kwargs: object) -> None:
        pass

    monkeypatch.setattr(
        botocore.handlers, "BUILTIN_HANDLERS", [*botocore.handlers.BUILTIN_HANDLERS, (event_name, handler)]
    )
    assert (event_name, handler) in janitor_handlers()
    aliaser = botocore.hooks.EventAliaser(botocore.hooks.HierarchicalEmitter())
    aliased = aliaser._alias_event_name(event_name)
    assert aliased_event(event_name) == aliased
    assert handler.__qualname__ in _handlers_called(janitor_session(), event_name)


@pytest.mark.parametrize("service", models.SERVICES)
def test_the_loader_reads_each_file_as_botocores_does(service: str) -> None:
    """The janitor's loader reads its files into dicts: the same values as botocore's reader, key for
    key in the same order."""
    ours = janitor_session().get_component("data_loader")
    theirs = botocore.loaders.Loader(extra_search_paths=[str(models.DATA_PATH)])
    for type_name in ("service-2", "endpoint-rule-set-1", "paginators-1", "waiters-2"):
        try:
            expected = theirs.load_service_model(service, type_name)
        except botocore.exceptions.DataNotFoundError:
            continue
        found = ours.load_service_model(service, type_name)
        assert found == expected and json.dumps(found) == json.dumps(expected), type_name
    for name in ("endpoints", "partitions", "sdk-default-configuration", "_retry"):
        assert json.dumps(ours.load_data(name)) == json.dumps(theirs.load_data(name)), name
