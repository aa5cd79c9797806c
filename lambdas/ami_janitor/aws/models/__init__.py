"""The SDK data the janitor's sessions load: service models cut to the operations the package calls, the
endpoint data cut to the services it uses, and a loader that looks only for those services.

A fresh botocore process pays, before its first call: about 27 ms listing every service directory of
its data (445, each stat'ed, once per model type), about 20 ms parsing the endpoint data of every
service (1.2 MB of JSON), and each client's whole model: EC2's 830 operations take about 60 ms, the
other services the janitor calls 5-30 ms each. A Lambda function pays that at every cold start, for the
few operations it calls.

The cuts keep every operation the package names and every shape those reach, unchanged but for their
documentation (`tests/unit/test_sdk_data_cut.py` fails on an operation named and not kept). S3 and STS
stay whole: the SDK calls operations of its own on them (S3's region redirects, the credential
providers). The data is found through a search path of the sessions the janitor makes itself
(`aws.clients.janitor_session`), ahead of botocore's own data and behind a user's (~/.aws/models,
AWS_DATA_PATH); paginators, waiters and endpoint rules still come from botocore.
`python -m ami_janitor.aws.models` writes the cuts again from the installed botocore (after an upgrade,
or when the janitor calls one more operation: add it below).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from botocore.exceptions import DataNotFoundError, UnknownServiceError
from botocore.loaders import JSONFileLoader, Loader, instance_cache

DATA_PATH = Path(__file__).resolve().parent
ENDPOINTS = DATA_PATH / "endpoints.json"

# The operations the package calls, by service (an operation only named, say in pacing's table, is kept too).
OPERATIONS: dict[str, tuple[str, ...]] = {
    "autoscaling": ("DescribeAutoScalingGroups", "DescribeLaunchConfigurations", "DeleteTags"),
    "batch": ("DescribeComputeEnvironments",),
    "dynamodb": (
        "BatchGetItem",
        "BatchWriteItem",
        "CreateTable",
        "DeleteItem",
        "DeleteResourcePolicy",
        "DeleteTable",
        "DescribeContinuousBackups",
        "DescribeTable",
        "DescribeTimeToLive",
        "GetItem",
        "GetResourcePolicy",
        "PutItem",
        "PutResourcePolicy",
        "Query",
        "Scan",
        "UpdateContinuousBackups",
        "UpdateItem",
        "UpdateTable",
        "UpdateTimeToLive",
    ),
    "ec2": (
        "CopyImage",
        "CreateImage",
        "CreateTags",
        "DeleteSnapshot",
        "DeleteTags",
        "DeregisterImage",
        "DescribeFleets",
        "DescribeImageAttribute",
        "DescribeImageReferences",
        "DescribeImages",
        "DescribeInstances",
        "DescribeLaunchTemplateVersions",
        "DescribeLaunchTemplates",
        "DescribeSnapshots",
        "DescribeSpotFleetRequests",
        "DescribeSpotInstanceRequests",
        "DisableImage",
        "DisableImageDeprecation",
        "EnableImage",
        "EnableImageDeprecation",
        "GetImageBlockPublicAccessState",
        "ModifyImageAttribute",
        "RegisterImage",  # not called: named in aws/pacing.py's table
    ),
    "emr": ("DescribeCluster", "GetSession", "ListClusters", "ListInstanceFleets", "ListInstanceGroups"),
    "imagebuilder": (
        "CreateImage",  # not called: named as EC2's
        "GetContainerRecipe",  # not called: named among DescribeImageReferences' permissions
        "GetImage",
        "ListContainerRecipes",
        "ListImageRecipes",
    ),
    "kms": (
        "CreateGrant",
        "Decrypt",
        "DescribeKey",
        "Encrypt",
        "GenerateDataKeyWithoutPlaintext",
        "ReEncrypt",
        "Sign",
        "UpdateAlias",
    ),
    "organizations": (
        "DeleteResourcePolicy",
        "DescribeOrganization",
        "ListAccounts",
        "ListAccountsForParent",
        "ListChildren",
        "PutResourcePolicy",
    ),
    "rbin": ("ListRules",),
    "sns": ("Publish",),
    "sqs": ("ChangeMessageVisibilityBatch", "SendMessage", "SendMessageBatch"),
    "ssm": (
        "DeleteResourcePolicy",
        "DescribeParameters",
        "GetCommandInvocation",
        "GetParameters",
        "PutParameter",
        "PutResourcePolicy",
        "SendCommand",
    ),
}
# Used whole: the SDK calls operations of its own on them.
WHOLE = ("s3", "sts")
# The SDK's credential providers make clients of these (assume role, SSO, console sign-in).
CREDENTIALS = ("signin", "sso", "sso-oidc", "sts")
SERVICES = tuple(sorted({*OPERATIONS, *WHOLE, *CREDENTIALS}))


def model_path(service: str, api_version: str) -> Path:
    return DATA_PATH / service / api_version / "service-2.json"


class DictFileLoader(JSONFileLoader):
    """botocore's file loader, but a JSON object is read into a dict, not an OrderedDict: a third of the
    time per file (EC2's cut 0.9 ms instead of 2.6), the same mappings in the same order (dicts keep
    their keys' order, and the SDK only reads them as mappings)."""

    def _load_file(self, full_path: str, open_method: Any) -> Any:
        if not os.path.isfile(full_path):
            return None
        with open_method(full_path, "rb") as fp:
            return json.loads(fp.read().decode("utf-8"))


class JanitorLoader(Loader):
    """botocore's loader, but a service is one of SERVICES (botocore lists every directory of its data,
    and of a user's, before it loads any model, to say whether the service exists), and its files are
    read into dicts (DictFileLoader)."""

    FILE_LOADER_CLASS = DictFileLoader

    @instance_cache
    def load_service_model(self, service_name: str, type_name: str, api_version: str | None = None) -> Any:
        """botocore's, but a janitor service's model is looked for in that service's directories only:
        botocore first lists every service (here all of SERVICES, each in every search path, for each
        model type a client loads) to say whether this one exists. The same model, extras included, and
        the same error where the service lacks the type (UnknownServiceError, a DataNotFoundError)."""
        if service_name not in SERVICES:
            return super().load_service_model(service_name, type_name, api_version)
        try:
            versions = self.list_api_versions(service_name, type_name)
        except DataNotFoundError:
            raise UnknownServiceError(
                service_name=service_name,
                known_service_names=", ".join(self.list_available_services(type_name)),
            ) from None
        version = api_version or max(versions)
        model = self.load_data(os.path.join(service_name, version, type_name))
        extras = self._find_extras(service_name, type_name, version)  # type: ignore[attr-defined]
        self._extras_processor.process(model, extras)  # type: ignore[attr-defined]  # botocore's, unstubbed
        return model

    @instance_cache
    def list_available_services(self, type_name: str) -> list[str]:
        found: set[str] = set()
        for path in self.search_paths:
            if not os.path.isdir(path):  # ~/.aws/models, mostly
                continue
            for service in SERVICES:
                if service in found:  # in an earlier path: not looked for again
                    continue
                directory = os.path.join(path, service)
                if os.path.isdir(directory) and any(
                    self.file_loader.exists(os.path.join(directory, version, type_name))
                    for version in os.listdir(directory)
                ):
                    found.add(service)
        return sorted(found)


def janitor_loader(data_path: str | None) -> Loader:
    """The loader of a janitor session: a user's data path first (AWS_DATA_PATH, the profile's
    data_path), then ~/.aws/models, then the cuts, then botocore's own data."""
    loader = JanitorLoader(extra_search_paths=data_path.split(os.pathsep) if data_path else None)
    builtin = Loader.BUILTIN_DATA_PATH
    paths = loader.search_paths
    if ENDPOINTS.is_file():  # a package installed without its data falls back to the SDK's own
        paths.insert(paths.index(builtin) if builtin in paths else len(paths), str(DATA_PATH))
    return loader
