"""The services beside EC2 that a scheduled run reads, in memory, for one account and region of an
organization: SSM parameters, Auto Scaling, Batch, EMR, Recycle Bin (empty but for SSM), STS (the
account), Organizations (the owner's view of its organization), S3 (the usage inbox and the report
bucket, one store shared by every account), SQS (SendMessageBatch to a FIFO queue) and SNS (Publish),
their messages kept for the pollers that deliver them (Queues).

Each client belongs to the in-memory EC2 of its account-region (tests/fake_ec2.py): a call takes that
fake's latency on its simulated clock (and its turn among lanes), is counted in `calls` keyed like IAM
actions ('ssm:DescribeParameters'), and is checked against botocore's model of the service. Paged
answers go through botocore's own paginators. These services' throttling is not modelled.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from types import SimpleNamespace
from typing import Any

import botocore.session
from botocore import xform_name
from botocore.model import ServiceModel
from botocore.paginate import Paginator
from botocore.validate import ParamValidator

from ami_janitor.aws.clients import RegionClients
from fake_ec2 import FakeEC2, client_error
from sessions import botocore_session

_SESSION = botocore_session("us-east-1", "x", "x")
_VALIDATOR = ParamValidator()


@cache
def _model(service: str) -> ServiceModel:
    return botocore.session.get_session().get_service_model(service)


@cache
def _pagination(service: str, api: str) -> dict[str, Any]:
    return dict(botocore.session.get_session().get_paginator_model(service).get_paginator(api))


@cache
def _operations(service: str) -> dict[str, str]:
    """Method name -> API name ('describe_parameters' -> 'DescribeParameters')."""
    return {xform_name(name): name for name in _model(service).operation_names}


class FakeService:
    """A client of one service, on the clock of its account-region's fake EC2."""

    service = ""  # botocore's name of the service

    def __init__(self, ec2: FakeEC2, calls: Counter[str]) -> None:
        self.ec2 = ec2
        self.calls = calls
        self.meta = SimpleNamespace(region_name=ec2.region)

    def _request(self, operation: str, params: Mapping[str, Any]) -> str:
        api = _operations(self.service)[operation]
        model = _model(self.service)
        shape = model.operation_model(api).input_shape
        if shape is None:  # an operation without parameters
            if params:
                raise client_error("ValidationException", f"{api} takes no parameters", api)
        elif (report := _VALIDATOR.validate(params, shape)).has_errors():
            raise client_error("ValidationException", report.generate_report(), api)
        self.ec2.turn()
        self.calls[f"{model.signing_name}:{api}"] += 1
        self.ec2.elapsed += self.ec2.latency
        return api

    def get_paginator(self, operation: str) -> Paginator:
        api = _operations(self.service)[operation]
        model = _model(self.service).operation_model(api)
        return Paginator(getattr(self, operation), _pagination(self.service, api), model)


def _paged(
    found: Sequence[Any], params: Mapping[str, Any], size_key: str, token_key: str = "NextToken"
) -> tuple[list[Any], dict[str, str]]:
    start = int(params.get(token_key) or 0)
    size = int(params.get(size_key) or len(found) or 1)
    end = start + size
    return list(found[start:end]), ({token_key: str(end)} if end < len(found) else {})


class FakeSSM(FakeService):
    """String parameters, name -> value, each with the simulated time it last changed (`put`)."""

    service = "ssm"

    def __init__(
        self, ec2: FakeEC2, calls: Counter[str], parameters: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(ec2, calls)
        self.parameters = dict(parameters or {})
        self.modified = dict.fromkeys(self.parameters, ec2.clock)

    def put(self, name: str, value: str, at: datetime | None = None) -> None:
        self.parameters[name] = value
        self.modified[name] = at or self.ec2.clock

    def describe_parameters(self, **params: Any) -> dict[str, Any]:
        self._request("describe_parameters", params)
        found = [
            {"Name": name, "Type": "String", "LastModifiedDate": self.modified.get(name, self.ec2.clock)}
            for name in sorted(self.parameters)
        ]
        page, token = _paged(found, params, "MaxResults")
        return {"Parameters": page, **token}

    def get_parameters(self, **params: Any) -> dict[str, Any]:
        self._request("get_parameters", params)
        names = params["Names"]
        if len(names) > 10:
            raise client_error("ValidationException", "at most 10 names", "GetParameters")
        return {
            "Parameters": [
                {"Name": n, "Type": "String", "Value": self.parameters[n]}
                for n in names
                if n in self.parameters
            ],
            "InvalidParameters": [n for n in names if n not in self.parameters],
        }


class FakeAutoScaling(FakeService):
    """The launch configurations a test adds (`launch_configurations`, as DescribeLaunchConfigurations
    answers them); no Auto Scaling group."""

    service = "autoscaling"

    def __init__(self, ec2: FakeEC2, calls: Counter[str]) -> None:
        super().__init__(ec2, calls)
        self.launch_configurations: list[dict[str, Any]] = []

    def describe_launch_configurations(self, **params: Any) -> dict[str, Any]:
        self._request("describe_launch_configurations", params)
        page, token = _paged(self.launch_configurations, params, "MaxRecords")
        return {"LaunchConfigurations": page, **token}

    def describe_auto_scaling_groups(self, **params: Any) -> dict[str, Any]:
        self._request("describe_auto_scaling_groups", params)
        return {"AutoScalingGroups": []}


class FakeBatch(FakeService):
    service = "batch"

    def describe_compute_environments(self, **params: Any) -> dict[str, Any]:
        self._request("describe_compute_environments", params)
        return {"computeEnvironments": []}


class FakeEMR(FakeService):
    service = "emr"

    def list_clusters(self, **params: Any) -> dict[str, Any]:
        self._request("list_clusters", params)
        return {"Clusters": []}


class FakeRecycleBin(FakeService):
    service = "rbin"

    def list_rules(self, **params: Any) -> dict[str, Any]:
        self._request("list_rules", params)
        return {"Rules": []}


class FakeImageBuilder(FakeService):
    """The account's own image recipes, each an ARN -> what it builds on (its parentImage: an AMI id or
    an image's ARN), in pages of maxResults; none shared with it, no container recipe. `images`: the
    Image Builder images it may read (ARN -> region -> AMI id); any other is not found."""

    service = "imagebuilder"

    def __init__(
        self,
        ec2: FakeEC2,
        calls: Counter[str],
        recipes: Mapping[str, str] | None = None,
        images: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        super().__init__(ec2, calls)
        self.recipes = dict(recipes or {})
        self.images = dict(images or {})

    def list_image_recipes(self, **params: Any) -> dict[str, Any]:
        self._request("list_image_recipes", params)
        own = params["owner"] == "Self"
        found = [{"arn": arn, "parentImage": image} for arn, image in sorted(self.recipes.items()) if own]
        page, token = _paged(found, params, "maxResults", "nextToken")
        return {"imageRecipeSummaryList": page, **token}

    def list_container_recipes(self, **params: Any) -> dict[str, Any]:
        self._request("list_container_recipes", params)
        return {"containerRecipeSummaryList": []}

    def get_image(self, **params: Any) -> dict[str, Any]:
        self._request("get_image", params)
        arn = params["imageBuildVersionArn"]
        if arn not in self.images:
            raise client_error("ResourceNotFoundException", f"{arn} not found", "GetImage")
        amis = [{"region": region, "image": ami} for region, ami in sorted(self.images[arn].items())]
        return {"image": {"arn": arn, "outputResources": {"amis": amis}}}


class FakeSTS(FakeService):
    service = "sts"

    def __init__(self, ec2: FakeEC2, calls: Counter[str], account: str) -> None:
        super().__init__(ec2, calls)
        self.account = account

    def get_caller_identity(self, **params: Any) -> dict[str, Any]:
        self._request("get_caller_identity", params)
        return {
            "Account": self.account,
            "UserId": "AROAEXAMPLE:ami-janitor",
            "Arn": f"arn:aws:sts::{self.account}:assumed-role/ami-janitor-scheduled/ami-janitor",
        }


@dataclass
class Organization:
    """An organization: its id, its management account, and its member accounts (all active, in the root)."""

    id: str
    management: str
    accounts: list[str] = field(default_factory=list)

    @property
    def arn(self) -> str:
        return f"arn:aws:organizations::{self.management}:organization/{self.id}"


class FakeOrganizations(FakeService):
    """The organization as its management account (or a delegated administrator) lists it."""

    service = "organizations"

    def __init__(self, ec2: FakeEC2, calls: Counter[str], organization: Organization) -> None:
        super().__init__(ec2, calls)
        self.organization = organization

    def describe_organization(self, **params: Any) -> dict[str, Any]:
        self._request("describe_organization", params)
        org = self.organization
        return {"Organization": {"Id": org.id, "Arn": org.arn, "MasterAccountId": org.management}}

    def _accounts(self) -> list[dict[str, Any]]:
        return [{"Id": a, "State": "ACTIVE", "Status": "ACTIVE"} for a in sorted(self.organization.accounts)]

    def list_accounts(self, **params: Any) -> dict[str, Any]:
        self._request("list_accounts", params)
        page, token = _paged(self._accounts(), params, "MaxResults")
        return {"Accounts": page, **token}

    def list_accounts_for_parent(self, **params: Any) -> dict[str, Any]:
        self._request("list_accounts_for_parent", params)
        page, token = _paged(self._accounts(), params, "MaxResults")
        return {"Accounts": page, **token}

    def list_children(self, **params: Any) -> dict[str, Any]:
        self._request("list_children", params)
        return {"Children": []}


@dataclass(frozen=True)
class StoredObject:
    body: bytes
    last_modified: datetime  # the writer's simulated clock when S3 stored it
    writer: str  # the account that wrote it


@dataclass
class Inbox:
    """The objects of every bucket, shared by every account's S3 client (one organization's inbox)."""

    objects: dict[tuple[str, str], StoredObject] = field(default_factory=dict)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        return sorted(k for b, k in self.objects if b == bucket and k.startswith(prefix))


class FakeS3(FakeService):
    """PutObject and GetObject on the shared inbox; LastModified is the writer's simulated clock."""

    service = "s3"

    def __init__(self, ec2: FakeEC2, calls: Counter[str], inbox: Inbox, account: str) -> None:
        super().__init__(ec2, calls)
        self.inbox = inbox
        self.account = account

    def put_object(self, **params: Any) -> dict[str, Any]:
        self._request("put_object", params)
        body = params.get("Body", b"")
        data = body.encode() if isinstance(body, str) else bytes(body)
        self.inbox.objects[(params["Bucket"], params["Key"])] = StoredObject(
            data, self.ec2.clock, self.account
        )
        return {"ETag": f'"{len(data):x}"'}

    def list_objects_v2(self, **params: Any) -> dict[str, Any]:
        self._request("list_objects_v2", params)
        keys = self.inbox.keys(params["Bucket"], params.get("Prefix", ""))[: params.get("MaxKeys", 1000)]
        return {"KeyCount": len(keys), **({"Contents": [{"Key": k} for k in keys]} if keys else {})}

    def get_object(self, **params: Any) -> dict[str, Any]:
        api = self._request("get_object", params)
        stored = self.inbox.objects.get((params["Bucket"], params["Key"]))
        if stored is None:
            raise client_error("NoSuchKey", "The specified key does not exist.", api)
        return {
            "Body": io.BytesIO(stored.body),
            "LastModified": stored.last_modified,
            "ContentLength": len(stored.body),
        }


@dataclass(frozen=True)
class QueuedMessage:
    id: str
    body: str
    group: str
    deduplication: str


@dataclass
class Queues:
    """The messages of every queue, by URL, in the order sent, and the notifications of every topic
    (shared by every client of an account, as Inbox): what the services' pollers deliver."""

    messages: dict[str, list[QueuedMessage]] = field(default_factory=dict)
    deduplicated: set[tuple[str, str]] = field(default_factory=set)  # (queue, deduplication id) sent
    published: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    def take(self, queue_url: str) -> QueuedMessage | None:
        """The queue's next message, gone from it: Lambda's poller received it, the function handled
        it and the poller deleted it (Lambda's own calls, not the function's)."""
        waiting = self.messages.get(queue_url) or []
        return waiting.pop(0) if waiting else None


class FakeSQS(FakeService):
    """SendMessageBatch to a FIFO queue: at most ten entries; a deduplication id sent before adds
    nothing (SQS's deduplication window: the fake's whole life)."""

    service = "sqs"

    def __init__(self, ec2: FakeEC2, calls: Counter[str], queues: Queues) -> None:
        super().__init__(ec2, calls)
        self.queues = queues

    def send_message_batch(self, **params: Any) -> dict[str, Any]:
        api = self._request("send_message_batch", params)
        entries = params["Entries"]
        if not 1 <= len(entries) <= 10:
            raise client_error("AWS.SimpleQueueService.TooManyEntriesInBatchRequest", "at most 10", api)
        queue = params["QueueUrl"]
        waiting = self.queues.messages.setdefault(queue, [])
        successful = []
        for entry in entries:
            group, deduplication = entry.get("MessageGroupId"), entry.get("MessageDeduplicationId")
            if not group or not deduplication:
                raise client_error("MissingParameter", "a FIFO queue's message needs its group and id", api)
            message = QueuedMessage(f"m-{deduplication[:12]}", entry["MessageBody"], group, deduplication)
            if (queue, deduplication) not in self.queues.deduplicated:
                self.queues.deduplicated.add((queue, deduplication))
                waiting.append(message)
            successful.append({"Id": entry["Id"], "MessageId": message.id, "MD5OfMessageBody": ""})
        return {"Successful": successful, "Failed": []}


class FakeSNS(FakeService):
    """Publish to a topic: the notification kept in the shared Queues."""

    service = "sns"

    def __init__(self, ec2: FakeEC2, calls: Counter[str], queues: Queues) -> None:
        super().__init__(ec2, calls)
        self.queues = queues

    def publish(self, **params: Any) -> dict[str, Any]:
        self._request("publish", params)
        sent = self.queues.published.setdefault(params["TopicArn"], [])
        sent.append({"Subject": params.get("Subject", ""), "Message": params["Message"]})
        return {"MessageId": f"n-{len(sent)}"}


@dataclass
class AccountRegion:
    """One account's region: its EC2 (with the ledger), the other services' clients, and their calls."""

    account: str
    ec2: FakeEC2
    ssm: FakeSSM
    calls: Counter[str]  # of the services beside EC2 and the ledger
    services: dict[str, Any]  # service name -> its fake client

    @property
    def clients(self) -> RegionClients:
        """New clients of the region (a new invocation's) on the same fakes."""
        return RegionClients(self.ec2.region, _SESSION, read_workers=1, **self.services)

    def api_calls(self) -> Counter[str]:
        """Every call this account-region made, keyed like IAM actions: EC2 (refused ones included),
        the ledger's writes and reads (DynamoDB), and the other services'."""
        counted: Counter[str] = Counter(self.calls)
        for call in self.ec2.calls:
            if call.operation.startswith("ledger_"):
                counted["dynamodb:UpdateItem"] += 1
            else:
                counted["ec2:" + "".join(w.title() for w in call.operation.split("_"))] += 1
        counted.update({f"dynamodb:{api}": n for api, n in self.ec2.dynamodb.calls.items()})
        return counted


def account_region(
    ec2: FakeEC2,
    account: str,
    inbox: Inbox,
    *,
    organization: Organization | None = None,
    parameters: Mapping[str, str] | None = None,
    queues: Queues | None = None,
    recipes: Mapping[str, str] | None = None,
    images: Mapping[str, Mapping[str, str]] | None = None,
) -> AccountRegion:
    """The clients of one account's region around its fake EC2: what a scheduled run and a slice read
    (`clients` reads one call at a time: the fake is not thread-safe outside its lanes); `queues`: the
    account's SQS queues and SNS topics; `recipes`: its Image Builder image recipes (ARN -> AMI id or
    image ARN) and `images` the Image Builder images it may read (ARN -> region -> AMI id)."""
    calls: Counter[str] = Counter()
    queued = queues if queues is not None else Queues()
    ssm = FakeSSM(ec2, calls, parameters)
    services: dict[str, Any] = {
        "ec2": ec2,
        "dynamodb": ec2.dynamodb,
        "ssm": ssm,
        "autoscaling": FakeAutoScaling(ec2, calls),
        "batch": FakeBatch(ec2, calls),
        "emr": FakeEMR(ec2, calls),
        "rbin": FakeRecycleBin(ec2, calls),
        "imagebuilder": FakeImageBuilder(ec2, calls, recipes, images),
        "sts": FakeSTS(ec2, calls, account),
        "s3": FakeS3(ec2, calls, inbox, account),
        "sqs": FakeSQS(ec2, calls, queued),
        "sns": FakeSNS(ec2, calls, queued),
    }
    if organization is not None:
        services["organizations"] = FakeOrganizations(ec2, calls, organization)
    return AccountRegion(account=account, ec2=ec2, ssm=ssm, calls=calls, services=services)


def region_clients(ec2: FakeEC2, *, read_workers: int = 1, account: str = "123456789012") -> RegionClients:
    """The clients of `ec2`'s region on the fakes (its EC2 and ledger, and an account's other
    services, each empty): what a scheduled run or a slice reads."""
    services = account_region(ec2, account, Inbox()).services
    return RegionClients(ec2.region, _SESSION, read_workers=read_workers, **services)
