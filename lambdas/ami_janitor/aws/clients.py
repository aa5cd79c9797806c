"""Clients per region, with adaptive retries. The only place clients are configured.

Sessions are botocore's (boto3's clients are botocore's clients): the functions never import boto3,
whose import (its session, resources and transfer modules) was about a twentieth of a cold start."""

from __future__ import annotations

import gc
import os
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import botocore.session
from botocore import handlers
from botocore.config import Config
from botocore.credentials import Credentials, EnvProvider, RefreshableCredentials
from botocore.hooks import EVENT_ALIASES, BaseEventHooks, EventAliaser, HierarchicalEmitter
from botocore.httpsession import URLLib3Session, create_urllib3_context, get_cert_path
from botocore.session import Session

from ami_janitor.aws import models
from ami_janitor.aws.pacing import Pacer, pace

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient
    from mypy_boto3_batch import BatchClient
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_emr import EMRClient
    from mypy_boto3_kms import KMSClient
    from mypy_boto3_rbin import RecycleBinClient
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sns import SNSClient
    from mypy_boto3_sqs import SQSClient
    from mypy_boto3_ssm import SSMClient
    from mypy_boto3_sts import STSClient


ClientT = TypeVar("ClientT")


def client_config() -> Config:
    # Throttling is normal at scale: adaptive retries pace the calls instead of failing them.
    # AMI_JANITOR_MAX_ATTEMPTS=1 for the emulator, where an unimplemented call is an HTTP 500: one
    # attempt, the first included (botocore's `max_attempts` would count the retries alone).
    attempts = int(os.environ.get("AMI_JANITOR_MAX_ATTEMPTS", "10"))
    return Config(
        retries={"mode": "adaptive", "total_max_attempts": attempts}, user_agent_extra="ami-janitor"
    )


class _Client(Generic[ClientT]):
    """A typed, lazily made client of the region: `clients.ec2` is an EC2Client."""

    def __init__(self, service: str) -> None:
        self.service = service

    def __get__(self, clients: RegionClients, owner: type[RegionClients]) -> ClientT:
        return cast(ClientT, clients.client(self.service))


# Per-AMI reads (DescribeImageAttribute) in flight at once: the region's pacer keeps them to the API's
# rate (ClientFactory), and clients are thread-safe once made.
READ_WORKERS = 8
_SESSION_LOCK = threading.RLock()


@contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a client is made: the SDK parses its service's model
    (EC2's is megabytes of JSON) into acyclic dicts and lists kept for the life of the process, and
    the collections those allocations trigger rescan everything and find nothing."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


# The process's TLS contexts, one per CA bundle (verified_context); the lock makes the first connections
# of threads that start together load a bundle once, not once each.
_VERIFIED_CONTEXTS: dict[str, ssl.SSLContext] = {}
_VERIFIED_CONTEXTS_LOCK = threading.Lock()


def verified_context(ca_bundle: str) -> ssl.SSLContext:
    """The process's one TLS context for `ca_bundle`, made as botocore makes a client's
    (create_urllib3_context), the bundle loaded into it once: as it reads then, for the life of the
    process (the Lambda asset's, or a short CLI run's). Raises what loading it raises."""
    context = _VERIFIED_CONTEXTS.get(ca_bundle)  # every request asks: no lock once it is made
    if context is not None:
        return context
    with _VERIFIED_CONTEXTS_LOCK:
        context = _VERIFIED_CONTEXTS.get(ca_bundle)
        if context is None:
            context = create_urllib3_context()
            context.load_verify_locations(cafile=os.path.expanduser(ca_bundle))
            _VERIFIED_CONTEXTS[ca_bundle] = context
        return context


class SharedVerifiedSession(URLLib3Session):
    """botocore's HTTP session, whose direct HTTPS connections use the process's context for the CA
    bundle botocore names (verified_context), made at the first such connection, not the session's
    own context with the bundle loaded into it again.

    botocore gives each client a TLS context of its own and names the CA bundle on each connection
    pool, and urllib3 loads that bundle into the context at every new connection: about 17 ms each, a
    cold start's connections and each read worker's among them (botocore#3171, urllib3#3623). The
    bundle and the verification (CERT_REQUIRED, the host name checked by urllib3) are botocore's; a
    pool through a proxy (whose own TLS falls back to the pool's bundle), http, a session without
    verification and a bundle that cannot be loaded (a directory, a missing file: each connection then
    fails as botocore's) are left to botocore."""

    def _setup_ssl_cert(self, conn: Any, url: str, verification: Any) -> None:
        direct = getattr(conn, "proxy", None) is None and isinstance(getattr(conn, "conn_kw", None), dict)
        verified = direct and verification and url.lower().startswith("https")
        bundle = get_cert_path(verification) if verified else None
        if bundle:
            try:
                context = verified_context(bundle)
            except (OSError, ssl.SSLError):
                pass
            else:
                # What botocore sets, but the bundle: in the context already, and never on the pool
                # (a connection another thread makes meanwhile would load it again).
                conn.cert_reqs = "CERT_REQUIRED"
                conn.conn_kw["ssl_context"] = context
                conn.ca_certs = None
                return
        super()._setup_ssl_cert(conn, url, verification)  # type: ignore[misc]


def share_verified_context(client: Any) -> None:
    """`client`'s HTTP session made a SharedVerifiedSession. A client with a client certificate (which
    urllib3 would load into the shared context), or whose HTTP session is not botocore's URLLib3Session
    (a test's), keeps its own."""
    http = getattr(getattr(client, "_endpoint", None), "http_session", None)
    if type(http) is URLLib3Session and getattr(http, "_cert_file", None) is None:
        http.__class__ = SharedVerifiedSession


class RegionClients:
    """Lazily created clients of one region. Pass a session (profile) or prebuilt clients (tests);
    `read_workers=1` keeps reads in order (a Stubber expects its calls in sequence); otherwise per-AMI
    reads go `read_workers` at a time and the inventory's independent sources side by side.
    `run_facts` holds what is the same in every region of a run (the account, an organization's
    accounts): a ClientFactory's regions share one, so each is asked once per run."""

    def __init__(
        self,
        region: str,
        session: Session | None = None,
        *,
        read_workers: int = READ_WORKERS,
        pacer: Pacer | None = None,
        run_facts: dict[str, Any] | None = None,
        **clients: Any,
    ) -> None:
        self.region = region
        self._session = session or botocore.session.get_session()
        self._clients: dict[str, Any] = dict(clients)
        self.read_workers = read_workers
        self.pacer = pacer
        self.run_facts: dict[str, Any] = {} if run_facts is None else run_facts

    def client(self, service: str) -> Any:
        if service not in self._clients:
            with _SESSION_LOCK:  # a session is not thread-safe; the regions of a run share one
                if service not in self._clients:
                    with _collector_paused():
                        made = self._session.create_client(
                            service,
                            region_name=self.region,
                            config=client_config(),
                        )
                    share_verified_context(made)
                    if service == "ec2" and self.pacer is not None:
                        pace(made, self.pacer)  # each call waits for its token bucket
                    self._clients[service] = made
        return self._clients[service]

    def ec2_in(self, region: str) -> EC2Client:
        """EC2 in `region` on this session (a copy's source region, read only): this region's own
        client here; elsewhere one made once, unpaced (the pacer keeps this region's buckets)."""
        if region == self.region:
            return self.ec2
        key = f"ec2 in {region}"
        if key not in self._clients:
            with _SESSION_LOCK, _collector_paused():
                if key not in self._clients:
                    made = self._session.create_client("ec2", region_name=region, config=client_config())
                    share_verified_context(made)
                    self._clients[key] = made
        return cast("EC2Client", self._clients[key])

    ec2: _Client[EC2Client] = _Client("ec2")
    ssm: _Client[SSMClient] = _Client("ssm")
    autoscaling: _Client[AutoScalingClient] = _Client("autoscaling")
    batch: _Client[BatchClient] = _Client("batch")
    emr: _Client[EMRClient] = _Client("emr")
    sqs: _Client[SQSClient] = _Client("sqs")
    rbin: _Client[RecycleBinClient] = _Client("rbin")
    s3: _Client[S3Client] = _Client("s3")
    sns: _Client[SNSClient] = _Client("sns")
    dynamodb: _Client[DynamoDBClient] = _Client("dynamodb")
    sts: _Client[STSClient] = _Client("sts")
    # Untyped: only DescribeKey is called (no stubs package for KMS in the dev dependencies).
    kms: _Client[KMSClient] = _Client("kms")
    # Untyped (no stubs package in the dev dependencies): only read, to expand shares to accounts.
    organizations: _Client[Any] = _Client("organizations")


OPERATOR_SESSION_NAME = "ami-janitor-cli"


def known_regions(session: Session | None = None) -> set[str]:
    """Every EC2 region of every partition the installed SDK knows. Pass the session the clients will
    come from: the SDK's endpoint data it parses for this is then parsed once."""
    session = session or botocore.session.get_session()
    return {
        region
        for partition in session.get_available_partitions()
        for region in session.get_available_regions("ec2", partition_name=partition)
    }


def unknown_regions(regions: list[str], session: Session | None = None) -> list[str]:
    """'R (did you mean N?)' for each region the SDK does not know (a typo, or an SDK to update)."""
    import difflib  # the CLI and the synth ask; the functions never do, so they do not load it

    known = known_regions(session)
    problems = []
    for region in regions:
        if region not in known:
            nearest = difflib.get_close_matches(region, sorted(known), n=1)
            hint = f" (did you mean {nearest[0]}?)" if nearest else ""
            problems.append(f"{region}{hint}")
    return problems


def unknown_regions_message(regions: list[str], source: str, session: Session | None = None) -> str | None:
    """The policy error for regions the SDK does not know, or None: the CLI and the synth say the same."""
    unknown = unknown_regions(regions, session)
    if not unknown:
        return None
    return (
        f"{source}: unknown region {', '.join(unknown)} "
        "(not a region this AWS SDK knows: a typo, or update boto3)"
    )


def assumed_session(base: Session, role_arn: str) -> Session:
    """A session acting as `role_arn` (the operator role the stacks make under /ami-janitor/): the
    ledger's resource policy lets only that path write, so the CLI's writers go through it. The role is
    assumed again before its credentials expire (an hour): an apply of many regions, or one whose
    question waited, may outlast them."""
    sts = cast("STSClient", base.create_client("sts", config=client_config()))

    def assume() -> dict[str, str]:
        answer = sts.assume_role(
            RoleArn=role_arn, RoleSessionName=OPERATOR_SESSION_NAME, DurationSeconds=3600
        )
        credentials = answer["Credentials"]
        expiry = credentials["Expiration"]
        return {
            "access_key": credentials["AccessKeyId"],
            "secret_key": credentials["SecretAccessKey"],
            "token": credentials["SessionToken"],
            "expiry_time": expiry.isoformat() if isinstance(expiry, datetime) else str(expiry),
        }

    refreshed = RefreshableCredentials.create_from_metadata(
        assume(), refresh_using=assume, method="assume-role"
    )
    session = janitor_session()
    session.register_component("credential_provider", _Given(refreshed))
    region = base.get_config_variable("region")
    if region:
        session.set_config_variable("region", region)
    return session


# The names a handler's event gives the janitor's services: their own, the names botocore's events give
# them (Auto Scaling's events say `auto-scaling`) and the older names botocore aliases to those (EMR's
# `elasticmapreduce`).
_EVENT_NAMES = {*models.SERVICES, *(EVENT_ALIASES.get(name, name) for name in models.SERVICES)}
_EVENT_SERVICES = frozenset(
    {*_EVENT_NAMES, *(old for old, new in EVENT_ALIASES.items() if new in _EVENT_NAMES)}
)


def janitor_handlers() -> list[tuple[Any, ...]]:
    """botocore's built-in handlers that a janitor session's clients can call: those of every service
    and those of the janitor's services. Not the documentation's (`docs.`, run only by the SDK's
    documentation generator) nor those of other services (Glacier, RDS, Polly...). Registering each
    costs botocore about half a million instructions (it aliases the event's name and inspects the
    handler's signature): all 127 were most of the cost of making a session (58 million instructions;
    11 with these 56, their names aliased by aliased_event), and over half never run."""
    kept = []
    for spec in handlers.BUILTIN_HANDLERS:
        kind, _, rest = spec[0].partition(".")
        service = rest.split(".", 1)[0]
        if kind != "docs" and (not rest or service in _EVENT_SERVICES):
            kept.append(spec)
    return kept


def aliased_event(event_name: str) -> str:
    """The name botocore's EventAliaser gives a kept handler's event (`autoscaling` to `auto-scaling`):
    only a service part is ever an alias there, and the aliaser, which tries each of its 64 aliases on
    each part in turn, took over half of each handler's registration."""
    kind, _, rest = event_name.partition(".")
    service, dot, operation = rest.partition(".")
    return f"{kind}.{EVENT_ALIASES.get(service, service)}{dot}{operation}" if rest else kind


def _builtin_events() -> HierarchicalEmitter:
    """The events a botocore Session is made with, its built-in handlers registered: those kept alone,
    in botocore's order and before a library's initializers add theirs (Powertools'). They are botocore's
    own, each taking keyword arguments: registered as botocore's `register` would after checking that
    (`inspect` reads each one's signature, a third of a session's making), without the check."""
    emitter = HierarchicalEmitter()
    for spec in janitor_handlers():
        event_name, handler, *register_type = spec
        if not register_type:
            emitter._register(aliased_event(event_name), handler)  # type: ignore[attr-defined]
        elif register_type[0] is handlers.REGISTER_FIRST:
            emitter._register_first(aliased_event(event_name), handler)  # type: ignore[attr-defined]
        elif register_type[0] is handlers.REGISTER_LAST:
            emitter._register_last(aliased_event(event_name), handler, None)  # type: ignore[attr-defined]
    return emitter


class QuickAliaser(EventAliaser):
    """botocore's EventAliaser (which gives an event an old service name's new one: `autoscaling` to
    `auto-scaling`), answering at once for a name no alias can change. botocore tries each of its 65
    aliases on each name it has not seen, about 28 µs a name, and every client copies the aliaser with
    nothing seen: a cold start's two clients and three calls emit some 60 names, none of them aliased.
    An alias changes a name only where its first part is one of the name's parts; any other name
    goes through botocore's own search."""

    def __init__(self, event_emitter: BaseEventHooks, event_aliases: dict[str, str] | None = None) -> None:
        super().__init__(event_emitter, event_aliases)
        aliases: dict[str, str] = self._event_aliases  # type: ignore[attr-defined]
        self._first_parts = frozenset(old.split(".", 1)[0] for old in aliases)

    def _alias_event_name(self, event_name: str) -> str:
        seen: dict[str, str] = self._alias_name_cache  # type: ignore[attr-defined]
        if event_name not in seen and self._first_parts.isdisjoint(event_name.split(".")):
            seen[event_name] = event_name
        return super()._alias_event_name(event_name)  # type: ignore[misc]


class _Given:
    """A session's credential provider that gives the credentials it was made with."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

    def load_credentials(self) -> Credentials:
        return self._credentials


class EnvironmentFirst:
    """A janitor session's credentials: the environment's, as botocore's chain would find them first, or
    else that whole chain. Lambda gives a function its role's credentials in its environment, and
    botocore builds every provider of its chain before asking the first (the container's and the
    instance metadata's fetchers make an SSL context each): about 1.5 ms of each cold start, for
    providers never asked. A named profile skips the environment, as botocore's chain does."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def load_credentials(self) -> Credentials | None:
        if self._session.instance_variables().get("profile") is None:
            found: Credentials | None = EnvProvider().load()
            if found is not None:
                return found
        # botocore's own chain, as a session without this component makes it (its STS client for an
        # assumed role's profile in the region of the session's last client).
        resolver = self._session._create_credential_resolver()  # type: ignore[attr-defined]
        return resolver.load_credentials()


def janitor_session(profile_name: str | None = None) -> Session:
    """A session for the functions and the CLI that loads the janitor's cut of the SDK's data
    (`aws.models`): its services' models and endpoints parsed in a few ms instead of about 150, behind a
    user's own data (~/.aws/models, AWS_DATA_PATH); with botocore's built-in handlers of those services
    alone (janitor_handlers); its credentials the environment's before any other provider is made
    (EnvironmentFirst); its clients' event names aliased quickly (QuickAliaser)."""
    events = _builtin_events()
    session = botocore.session.Session(event_hooks=events, include_builtin_handlers=False)
    # The emitter its clients copy (the session's own wraps the same handlers).
    session.register_component("event_emitter", QuickAliaser(events))
    if profile_name is not None:  # before the loader: it reads the profile (ProfileNotFound, its data_path)
        session.set_config_variable("profile", profile_name)
    session.register_component("data_loader", models.janitor_loader(session.get_config_variable("data_path")))
    session.register_component("credential_provider", EnvironmentFirst(session))
    return session


class ClientFactory:
    """RegionClients per region, shared by one run (the engine acts on several regions from the CLI)."""

    def __init__(self, session: Session | None = None, *, burst: bool = True) -> None:
        # One session for every region: it loads each service's model once, not once per region; by
        # default the janitor's, which loads the cut of the SDK's data (janitor_session).
        self._session = session or janitor_session()
        self._regions: dict[str, RegionClients] = {}
        self._run_facts: dict[str, Any] = {}
        self.burst = burst

    def __call__(self, region: str) -> RegionClients:
        if region not in self._regions:
            # Every EC2 call of the run waits for its token in the region's buckets (aws/pacing.py): the
            # run never asks faster than EC2 refills, so its reads side by side (eight launch permissions
            # at once) throttle neither the run nor the account's other callers. Without `burst` (a slice
            # worker: the slice before it may have spent the burst) the buckets start empty.
            pacer = Pacer(full=self.burst)
            self._regions[region] = RegionClients(
                region, self._session, pacer=pacer, run_facts=self._run_facts
            )
        return self._regions[region]
