"""EC2 behaviour that moto 5.2.5 lacks or gets wrong, added to moto in this process (demo and tests only).

What EC2 does and moto does not: image deprecation, deregistration protection (and its refusal to
deregister), LastLaunchedTime, DisableImage dropping launch permissions, snapshot tags at CreateImage
and its refusal (CreateImage's and CopyImage's) of a name the account already gave an image in the
region (InvalidAMIName.Duplicate),
TagSpecifications and ClientToken on CopyImage, DeleteSnapshot refusing a snapshot any AMI still uses,
the image block public access state (per account and region, on as for a new account; reported,
not enforced: a public launch permission is still accepted).
What SSM does and moto does not: PutParameter refusing to change a parameter's data type to or from
`aws:ec2:image` (or `aws:ssm:integration`).
What moto lacks altogether (DescribeImageReferences, Recycle Bin, Image Builder) is answered the way
AWS answers an operation a partition does not offer: an HTTP 4xx naming the operation unknown, never
moto's NotImplementedError or HTML 500 page, which the janitor rightly reads as a failure.
DeregisterImage(DeleteAssociatedSnapshots=True) keeps moto's behaviour (snapshots stay, no
DeleteSnapshotResults), like the partitions that predate it: callers must handle both.

The patches reach into moto internals, so they are pinned to one moto version.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import json
import logging
import re
import socket
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import moto

MOTO_VERSION = "5.2.5"
DEFAULT_ACCOUNT_ID = "123456789012"

if moto.__version__ != MOTO_VERSION:
    raise RuntimeError(
        f"ami_janitor.demo.emulator patches moto {MOTO_VERSION} internals but moto {moto.__version__} is "
        f"installed: install moto[server]=={MOTO_VERSION} or port the patches"
    )

# moto's own exception classes: its serializer finds the service from the exception's module.
from moto import backends  # noqa: E402
from moto.core import responses as moto_responses  # noqa: E402
from moto.core.botocore_stubber import BotocoreStubber  # noqa: E402
from moto.core.responses import ActionResult  # noqa: E402
from moto.core.utils import camelcase_to_underscores  # noqa: E402
from moto.ec2.exceptions import (  # noqa: E402
    EC2ClientError,
    InvalidAMIIdError,
    InvalidSnapshotInUse,
    InvalidTaggableResourceType,
    OperationNotPermitted,
    UnvailableAMIIdError,
)
from moto.ec2.models import ec2_backends  # noqa: E402
from moto.ec2.models.amis import Ami, AmiBackend  # noqa: E402
from moto.ec2.models.elastic_block_store import EBSBackend  # noqa: E402
from moto.ec2.responses import EC2Response  # noqa: E402
from moto.ec2.responses.amis import AmisResponse  # noqa: E402
from moto.moto_server import werkzeug_app  # noqa: E402
from moto.moto_server.werkzeug_app import (  # noqa: E402
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from moto.server import ThreadedMotoServer  # noqa: E402
from moto.ssm.models import SimpleSystemManagerBackend  # noqa: E402
from moto.ssm.models import ValidationException as SsmValidationException  # noqa: E402
from werkzeug.exceptions import InternalServerError  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

_MARKER = "_ami_janitor_emulator"
_COOLDOWN = timedelta(hours=24)
# The account-level state EC2 gives new accounts; `unblocked` once disabled.
_BLOCK_NEW_SHARING = "block-new-sharing"
_UNBLOCKED = "unblocked"


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _ec2_time(value: datetime) -> str:
    """EC2's format for image times (DeprecationTime, LastLaunchedTime)."""
    return _aware(value).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _owned_ami(backend: Any, image_id: str) -> Any:
    """The moto Ami (typed Any: the attributes added here are unknown to moto's class)."""
    if image_id in backend.deleted_amis:
        raise UnvailableAMIIdError(image_id)
    if image_id not in backend.amis:
        raise InvalidAMIIdError(image_id)
    return backend.amis[image_id]


# ---- model: image block public access, one state per account and region -----------------------------


def enable_image_block_public_access(self: Any, state: str) -> str:
    if state != _BLOCK_NEW_SHARING:
        raise EC2ClientError(
            "InvalidParameterValue", f"ImageBlockPublicAccessState must be {_BLOCK_NEW_SHARING}, not {state}"
        )
    self.image_block_public_access_state = state
    return state


def disable_image_block_public_access(self: Any) -> str:
    self.image_block_public_access_state = _UNBLOCKED
    return _UNBLOCKED


# ---- model: deregistration protection, as DescribeImages reports it ------------------------------------


def _deregistration_protection(self: Any) -> str | None:
    until = self.protection_until
    if self.protection == "disabled" and until is not None and until > _now():
        return f"disabled-until {_ec2_time(until)}"
    protection: str | None = self.protection
    return protection


def _is_protected(ami: Any) -> bool:
    return str(ami.deregistration_protection or "").startswith(("enabled", "disabled-until"))


def _wrap_get_filter_value(original: Callable[..., Any]) -> Callable[..., Any]:
    def get_filter_value(self: Any, filter_name: str, method_name: str | None = None) -> Any:
        # DescribeImages' filters by the snapshot an AMI uses (moto has one snapshot per AMI) and by
        # the image a copy was made from.
        if filter_name == "block-device-mapping.snapshot-id":
            snapshot = getattr(self, "ebs_snapshot", None)
            return [snapshot.id] if snapshot is not None else []
        if filter_name == "source-image-id":  # set by CopyImage (below), as EC2 does
            return getattr(self, "source_image_id", None)
        return original(self, filter_name, method_name)

    return get_filter_value


# ---- model: backend operations --------------------------------------------------------------------


def enable_image_deprecation(self: Any, image_id: str, deprecate_at: datetime) -> None:
    ami = _owned_ami(self, image_id)
    # EC2 rounds the seconds to the nearest minute, refuses the past and more than 10 years ahead.
    at = (_aware(deprecate_at) + timedelta(seconds=30)).replace(second=0, microsecond=0)
    if at < _now().replace(second=0, microsecond=0) or at > _now() + timedelta(days=3653):
        raise EC2ClientError(
            "InvalidParameterValue", f"DeprecateAt {_ec2_time(at)} must be in the future and within 10 years"
        )
    ami.deprecation_time = _ec2_time(at)


def disable_image_deprecation(self: Any, image_id: str) -> None:
    _owned_ami(self, image_id).deprecation_time = None


def enable_image_deregistration_protection(self: Any, image_id: str, with_cooldown: bool) -> None:
    ami = _owned_ami(self, image_id)
    ami.protection = "enabled-with-cooldown" if with_cooldown else "enabled"
    ami.protection_until = None


def disable_image_deregistration_protection(self: Any, image_id: str) -> None:
    ami = _owned_ami(self, image_id)
    if ami.protection == "enabled-with-cooldown":
        ami.protection_until = _now() + _COOLDOWN  # still protected for 24 hours
    ami.protection = "disabled"


def _wrap_deregister_image(original: Callable[..., None]) -> Callable[..., None]:
    def deregister_image(self: Any, ami_id: str) -> None:
        ami = self.amis.get(ami_id)
        if ami is not None and _is_protected(ami):
            state = ami.deregistration_protection
            raise OperationNotPermitted(f"The image '{ami_id}' has deregistration protection ({state})")
        original(self, ami_id)

    return deregister_image


def _wrap_disable_image(original: Callable[..., None]) -> Callable[..., None]:
    def disable_image(self: Any, ami_id: str) -> None:
        original(self, ami_id)
        # EC2 makes a disabled AMI private: every launch permission goes.
        self.amis[ami_id].launch_permissions = []

    return disable_image


def _tag_image_and_snapshot(ami: Any, tag_specifications: list[dict[str, Any]]) -> None:
    for spec in tag_specifications:
        kind = str(spec.get("ResourceType"))
        if kind not in ("image", "snapshot"):
            raise InvalidTaggableResourceType(kind)
        target = ami if kind == "image" else ami.ebs_snapshot
        for tag in spec.get("Tags") or []:
            target.add_tag(tag["Key"], tag.get("Value", ""))


def _wrap_create_image(original: Callable[..., Any]) -> Callable[..., Any]:
    def create_image(
        self: Any, instance_id: str, name: str, description: str, tag_specifications: list[dict[str, Any]]
    ) -> Any:
        # EC2 keeps an image name unique per account and region; moto takes any name again.
        taken = next(
            (ami for ami in self.amis.values() if ami.name == name and ami.owner_id == self.account_id), None
        )
        if taken is not None:
            raise EC2ClientError(
                "InvalidAMIName.Duplicate", f"AMI name {name} is already in use by AMI {taken.id}"
            )
        # moto raises NotImplementedError on a snapshot TagSpecification: tag the snapshot here instead.
        snapshot_specs = [s for s in tag_specifications if s.get("ResourceType") == "snapshot"]
        other_specs = [s for s in tag_specifications if s.get("ResourceType") != "snapshot"]
        ami = original(self, instance_id, name, description, tag_specifications=other_specs)
        _tag_image_and_snapshot(ami, snapshot_specs)
        return ami

    return create_image


def _wrap_copy_image(original: Callable[..., Any]) -> Callable[..., Any]:
    def copy_image(
        self: Any,
        source_image_id: str,
        source_region: str,
        name: str | None = None,
        description: str | None = None,
        tag_specifications: list[dict[str, Any]] | None = None,
        client_token: str | None = None,
    ) -> Any:
        # EC2 remembers a ClientToken (even after the copy is deregistered) and answers with the same image.
        tokens: dict[str, Any] = self.__dict__.setdefault("_ami_janitor_copy_tokens", {})
        if client_token and client_token in tokens:
            return tokens[client_token]
        taken = next(
            (ami for ami in self.amis.values() if ami.name == name and ami.owner_id == self.account_id), None
        )
        if name is not None and taken is not None:  # unique per account and region, as for CreateImage
            raise EC2ClientError(
                "InvalidAMIName.Duplicate", f"AMI name {name} is already in use by AMI {taken.id}"
            )
        ami = original(self, source_image_id, source_region, name, description)
        ami.source_image_id = source_image_id
        ami.source_image_region = source_region
        _tag_image_and_snapshot(ami, tag_specifications or [])
        if client_token:
            tokens[client_token] = ami
        return ami

    return copy_image


def _wrap_delete_snapshot(original: Callable[..., Any]) -> Callable[..., Any]:
    def delete_snapshot(self: Any, snapshot_id: str) -> Any:
        # moto only knows the AMI a snapshot was made for; EC2 refuses while any AMI maps it.
        for ami in self.amis.values():
            if ami.ebs_snapshot.id == snapshot_id:
                raise InvalidSnapshotInUse(snapshot_id, ami.id)
        return original(self, snapshot_id)

    return delete_snapshot


# ---- responses: parse the request, call the backend ------------------------------------------------


def _respond_enable_image_deprecation(self: Any) -> ActionResult:
    self.error_on_dryrun()
    self.ec2_backend.enable_image_deprecation(self._get_param("ImageId"), self._get_param("DeprecateAt"))
    return ActionResult({"Return": True})


def _respond_disable_image_deprecation(self: Any) -> ActionResult:
    self.error_on_dryrun()
    self.ec2_backend.disable_image_deprecation(self._get_param("ImageId"))
    return ActionResult({"Return": True})


def _respond_enable_image_deregistration_protection(self: Any) -> ActionResult:
    self.error_on_dryrun()
    self.ec2_backend.enable_image_deregistration_protection(
        self._get_param("ImageId"), bool(self._get_param("WithCooldown", False))
    )
    return ActionResult({"Return": "true"})


def _respond_disable_image_deregistration_protection(self: Any) -> ActionResult:
    self.error_on_dryrun()
    self.ec2_backend.disable_image_deregistration_protection(self._get_param("ImageId"))
    return ActionResult({"Return": "true"})


def _respond_get_image_block_public_access_state(self: Any) -> ActionResult:
    self.error_on_dryrun()
    state = self.ec2_backend.image_block_public_access_state
    return ActionResult({"ImageBlockPublicAccessState": state, "ManagedBy": "account"})


def _respond_enable_image_block_public_access(self: Any) -> ActionResult:
    self.error_on_dryrun()
    state = self.ec2_backend.enable_image_block_public_access(self._get_param("ImageBlockPublicAccessState"))
    return ActionResult({"ImageBlockPublicAccessState": state})


def _respond_disable_image_block_public_access(self: Any) -> ActionResult:
    self.error_on_dryrun()
    return ActionResult({"ImageBlockPublicAccessState": self.ec2_backend.disable_image_block_public_access()})


def _respond_copy_image(self: Any) -> ActionResult:
    self.error_on_dryrun()
    image = self.ec2_backend.copy_image(
        self._get_param("SourceImageId"),
        self._get_param("SourceRegion"),
        self._get_param("Name"),
        self._get_param("Description"),
        tag_specifications=self._get_param("TagSpecifications", []),
        client_token=self._get_param("ClientToken"),
    )
    return ActionResult({"ImageId": image.id})


# ---- operations moto lacks: answered as AWS answers an operation it does not offer ----------------------


def _wrap_ec2_call_action(original: Callable[..., Any]) -> Callable[..., Any]:
    def call_action(self: Any) -> Any:
        try:
            return original(self)
        except NotImplementedError:
            action = self._get_action()
            if camelcase_to_underscores(action) in _MethodNames(type(self)):
                raise  # an implemented action that moto cannot do with these arguments: not ours to mask
            # EC2 answers an action it does not offer with InvalidAction (HTTP 400).
            error = EC2ClientError("InvalidAction", f"The action {action} is not valid for this web service.")
            status, headers, body = self.serialized(ActionResult(error))
            headers, body = self._enrich_response(headers, body)
            return status, headers, body

    return call_action


# ---- the server's answer time: what moto recomputes on every request, computed once ----------------------


class _MethodNames:
    """What moto asks of the list `method_names_from_class` makes (is this action a method of the
    response class?), answered by one lookup: moto lists every member of the class, about 1.5 ms on
    EC2's, on every request. Read at each request, so a method added or removed later counts."""

    def __init__(self, cls: type) -> None:
        self._cls = cls

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and inspect.isfunction(getattr(self._cls, name, None))


def _wrap_list_of_moto_modules(original: Callable[[], Any]) -> Callable[[], tuple[str, ...]]:
    """moto's package directories, listed once: the server lists and stats them twice a request."""
    return functools.cache(lambda: tuple(original()))


# The data types SSM will not change an existing parameter to or from (Parameter Store's "data types").
_FIXED_DATA_TYPES = frozenset({"aws:ec2:image", "aws:ssm:integration"})


def _wrap_put_parameter(original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)

    def put_parameter(self: Any, *args: Any, **kwargs: Any) -> Any:
        call = signature.bind(self, *args, **kwargs).arguments
        name, asked = call["name"], call["data_type"] or "text"
        held = self.get_parameter(name) if call["overwrite"] else None
        kept = (held.data_type or "text") if held is not None else asked
        if kept != asked and {kept, asked} & _FIXED_DATA_TYPES:
            raise SsmValidationException(
                f"The data type of parameter {name} is {kept}: you can't change a parameter to or from "
                f"the aws:ec2:image or aws:ssm:integration data type ({asked} asked)"
            )
        return original(self, *args, **kwargs)

    return put_parameter


# Services the janitor calls that moto 5.2.5 has no backend for (REST-JSON protocol).
_ABSENT_SERVICES = frozenset({"imagebuilder", "rbin"})
_ABSENT_HOST = re.compile(r"^https?://(?P<service>[a-z0-9-]+)\.[^/]*amazonaws\.com(?:/|$)")


def _unknown_operation(service: str, path: str) -> tuple[int, dict[str, str], str]:
    """An AWS REST-JSON service's answer to a route it does not know: UnknownOperationException (the
    code is what a caller reads; the status is the 404 of an unknown route)."""
    message = f"Unknown operation: {service} has no operation at {path}"
    headers = {
        "Content-Type": "application/json",
        "x-amzn-ErrorType": "UnknownOperationException",
        "x-amzn-RequestId": str(uuid.uuid4()),
    }
    return 404, headers, json.dumps({"message": message})


def _wrap_process_request(original: Callable[..., Any]) -> Callable[..., Any]:
    """In process (mock_aws): a request to an absent service, which moto answers 404 'Not yet implemented'."""

    def process_request(self: Any, request: Any) -> Any:
        match = _ABSENT_HOST.match(str(request.url))
        if match and match["service"] in _ABSENT_SERVICES:
            return _unknown_operation(match["service"], urlsplit(str(request.url)).path or "/")
        return original(self, request)

    return process_request


def _signing_service(environ: dict[str, Any]) -> str | None:
    """The service a SigV4 request is signed for ('Credential=KEY/DATE/REGION/SERVICE/aws4_request')."""
    found = re.search(
        r"Credential=[^/,]+/[^/,]+/[^/,]+/([^/,]+)/", str(environ.get("HTTP_AUTHORIZATION") or "")
    )
    return found.group(1).lower() if found else None


def _wrap_dispatch(original: Callable[..., Any]) -> Callable[..., Any]:
    """In the server: a request to an absent service, which moto answers with an HTML 500 page."""

    def dispatch(self: Any, environ: dict[str, Any], start_response: Any) -> Any:
        service = _signing_service(environ)
        if service not in _ABSENT_SERVICES:
            return original(self, environ, start_response)
        status, headers, body = _unknown_operation(service, str(environ.get("PATH_INFO") or "/"))
        start_response(
            f"{status} {HTTPStatus(status).phrase}", [*headers.items(), ("Content-Length", str(len(body)))]
        )
        return [body.encode("utf-8")]

    return dispatch


# Defaults on the class reach every image, existing ones included; the serializer picks DeprecationTime,
# LastLaunchedTime, DeregistrationProtection, SourceImageId and SourceImageRegion from these snake_case names.
_AMI_FIELDS: dict[str, Any] = {
    "deprecation_time": None,
    "last_launched_time": None,
    "source_image_id": None,
    "source_image_region": None,
    "protection": None,
    "protection_until": None,
    "deregistration_protection": property(_deregistration_protection),
}
# A default on the backend class reaches every account and region until one is set.
_BACKEND_FIELDS: dict[str, Any] = {"image_block_public_access_state": _BLOCK_NEW_SHARING}
_BACKEND_METHODS: dict[str, Callable[..., Any]] = {
    "enable_image_block_public_access": enable_image_block_public_access,
    "disable_image_block_public_access": disable_image_block_public_access,
    "enable_image_deprecation": enable_image_deprecation,
    "disable_image_deprecation": disable_image_deprecation,
    "enable_image_deregistration_protection": enable_image_deregistration_protection,
    "disable_image_deregistration_protection": disable_image_deregistration_protection,
}
_BACKEND_WRAPPERS: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    "deregister_image": _wrap_deregister_image,
    "disable_image": _wrap_disable_image,
    "create_image": _wrap_create_image,
    "copy_image": _wrap_copy_image,
}
# The response class dispatches an action to the method of its snake_case name.
_RESPONSES: dict[str, Callable[[Any], ActionResult]] = {
    "enable_image_deprecation": _respond_enable_image_deprecation,
    "disable_image_deprecation": _respond_disable_image_deprecation,
    "enable_image_deregistration_protection": _respond_enable_image_deregistration_protection,
    "disable_image_deregistration_protection": _respond_disable_image_deregistration_protection,
    "copy_image": _respond_copy_image,
    "get_image_block_public_access_state": _respond_get_image_block_public_access_state,
    "enable_image_block_public_access": _respond_enable_image_block_public_access,
    "disable_image_block_public_access": _respond_disable_image_block_public_access,
}


def install() -> None:
    """Apply the patches to moto in this process. Idempotent."""
    if getattr(AmiBackend, _MARKER, False):
        return
    for name, value in _AMI_FIELDS.items():
        setattr(Ami, name, value)
    setattr(Ami, "get_filter_value", _wrap_get_filter_value(Ami.get_filter_value))  # noqa: B010
    for name, value in {**_BACKEND_FIELDS, **_BACKEND_METHODS}.items():
        setattr(AmiBackend, name, value)
    for name, wrap in _BACKEND_WRAPPERS.items():
        setattr(AmiBackend, name, wrap(getattr(AmiBackend, name)))
    setattr(EBSBackend, "delete_snapshot", _wrap_delete_snapshot(EBSBackend.delete_snapshot))  # noqa: B010
    put_parameter = _wrap_put_parameter(SimpleSystemManagerBackend.put_parameter)
    setattr(SimpleSystemManagerBackend, "put_parameter", put_parameter)  # noqa: B010
    for name, respond in _RESPONSES.items():
        setattr(AmisResponse, name, respond)
    setattr(EC2Response, "call_action", _wrap_ec2_call_action(EC2Response.call_action))  # noqa: B010
    setattr(BotocoreStubber, "process_request", _wrap_process_request(BotocoreStubber.process_request))  # noqa: B010
    setattr(DomainDispatcherApplication, "__call__", _wrap_dispatch(DomainDispatcherApplication.__call__))  # noqa: B010
    setattr(moto_responses, "method_names_from_class", _MethodNames)  # noqa: B010
    setattr(backends, "list_of_moto_modules", _wrap_list_of_moto_modules(backends.list_of_moto_modules))  # noqa: B010
    setattr(AmiBackend, _MARKER, True)


# ---- the server: connections kept open -------------------------------------------------------------


class _KeepAliveHandler(MotoRequestHandler):
    """moto's request handler on a connection kept open between requests. werkzeug's development server
    closes it after every answer (and keeps the thread reading what is left of it): each SDK call then
    pays a new TCP connection, and the server a new thread. A request whose body is framed by its
    Content-Length is read whole, answered with a Content-Length, and the connection stays open for the
    next; any other (chunked, `Expect: 100-continue`) goes werkzeug's way, and closes."""

    def setup(self) -> None:
        super().setup()
        # The head and the body of an answer are two writes: no waiting for the first one's ACK.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.open_connections.add(self.connection)  # type: ignore[attr-defined]

    def finish(self) -> None:
        self.server.open_connections.discard(self.connection)  # type: ignore[attr-defined]
        super().finish()

    def run_wsgi(self) -> None:
        length = self.headers.get("Content-Length")
        if (
            self.headers.get("Transfer-Encoding")
            or self.headers.get("Expect")
            or not (length or "0").isdigit()
        ):
            self.close_connection = True
            super().run_wsgi()
            return
        body = self.rfile.read(int(length or 0))
        self.environ = environ = self.make_environ()
        environ["wsgi.input"] = io.BytesIO(body)
        answer: dict[str, Any] = {}
        chunks: list[bytes] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            answer["status"], answer["headers"] = status, headers
            return chunks.append

        try:
            result = self.server.app(environ, start_response)
            try:
                chunks.extend(result)
            finally:
                if hasattr(result, "close"):
                    result.close()
        except Exception:  # as werkzeug answers an application's exception: a 500 page
            self.close_connection = True
            chunks.clear()
            chunks.extend(InternalServerError()(environ, start_response))
        code, _, reason = str(answer["status"]).partition(" ")
        payload = b"".join(chunks)
        self.send_response(int(code), reason)
        named = set()
        for name, value in answer["headers"]:
            self.send_header(name, value)
            named.add(name.lower())
        if "content-length" not in named:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


class CannotListen(OSError):
    """The server could not listen on the address asked for (a port in use, or one not allowed)."""


class _EmulatorServer(ThreadedMotoServer):
    """moto's threaded server with the keep-alive handler; stopping it closes the open connections.
    `start` binds the port itself and raises CannotListen where it cannot: in moto's thread, werkzeug
    would print, exit that thread, and leave `start` waiting forever."""

    _listening: socket.socket | None = None

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)
        assert self._listening is not None, "start() binds the socket"
        with self._listening:  # werkzeug serves a duplicate of it
            server = make_server(
                self._ip_address,
                self._port,
                app,
                True,
                request_handler=_KeepAliveHandler,
                fd=self._listening.fileno(),
            )
        server.open_connections = set()  # type: ignore[attr-defined]
        self._server = server
        self._server_ready_event.set()
        server.serve_forever()

    def start(self) -> None:
        try:
            self._listening = socket.create_server((self._ip_address, self._port))
        except (OSError, OverflowError) as error:  # in use, not allowed, or out of range
            raise CannotListen(f"cannot listen on {self._ip_address}:{self._port} ({error})") from None
        super().start()

    def stop(self) -> None:
        super().stop()
        if self._server is not None:
            for connection in list(self._server.open_connections):  # type: ignore[attr-defined]
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)


def start_server(host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadedMotoServer, str]:
    """Install the patches and start moto's server in this process; returns (server, endpoint URL).

    Port 0 picks a free port; one that cannot be bound is CannotListen. Clients on the endpoint should
    use retries={'total_max_attempts': 1}: a call moto cannot do is an HTTP 500, which boto3 would retry.
    """
    install()
    # Quiet: the request log and moto's tracebacks would bury the demo.
    logging.getLogger("werkzeug").setLevel(logging.CRITICAL)
    werkzeug_app.print = lambda *args, **kwargs: None  # type: ignore[attr-defined]
    server = _EmulatorServer(ip_address=host, port=port, verbose=False)
    server.start()  # CannotListen where the port cannot be bound
    bound_host, bound_port = server.get_host_and_port()
    if port and bound_port != port:  # never meant to happen: the socket was bound to `port`
        server.stop()
        raise CannotListen(f"cannot listen on {host}:{port} (the server bound {bound_port} instead)")
    return server, f"http://{bound_host}:{bound_port}"


def set_image_fields(
    region: str,
    image_id: str,
    *,
    creation_date: datetime | None = None,
    last_launched: datetime | None = None,
    architecture: str | None = None,
    snapshot_id: str | None = None,
    account_id: str = DEFAULT_ACCOUNT_ID,
) -> None:
    """Set what no API can: age an AMI, record a launch, set its architecture (moto's instances are all
    x86_64), or point its root mapping at another AMI's snapshot (AMIs registered from one snapshot share
    it). Only for moto running in this process."""
    install()
    backend = ec2_backends[account_id][region]
    ami = _owned_ami(backend, image_id)
    if creation_date is not None:
        ami.creation_date = _aware(creation_date).astimezone(UTC).replace(tzinfo=None)
    if last_launched is not None:
        ami.last_launched_time = _ec2_time(last_launched)
    if architecture is not None:
        ami.architecture = architecture
    if snapshot_id is not None:
        ami.ebs_snapshot = backend.get_snapshot(snapshot_id)
