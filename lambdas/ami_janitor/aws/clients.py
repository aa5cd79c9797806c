"""boto3 clients per region, with adaptive retries. The only place clients are configured."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient
    from mypy_boto3_batch import BatchClient
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_emr import EMRClient
    from mypy_boto3_rbin import RecycleBinClient
    from mypy_boto3_sqs import SQSClient
    from mypy_boto3_ssm import SSMClient
    from mypy_boto3_sts import STSClient


def client_config() -> Config:
    # Throttling is normal at scale: adaptive retries pace the calls instead of failing them.
    # AMI_JANITOR_MAX_ATTEMPTS=1 for the emulator, where an unimplemented call is an HTTP 500.
    attempts = int(os.environ.get("AMI_JANITOR_MAX_ATTEMPTS", "10"))
    return Config(retries={"mode": "adaptive", "max_attempts": attempts}, user_agent_extra="ami-janitor")


class RegionClients:
    """Lazily created clients of one region. Pass a session (profile) or prebuilt clients (tests)."""

    def __init__(self, region: str, session: boto3.Session | None = None, **clients: Any) -> None:
        self.region = region
        self._session = session or boto3.Session()
        self._clients: dict[str, Any] = dict(clients)

    def _get(self, service: str) -> Any:
        if service not in self._clients:
            self._clients[service] = self._session.client(  # type: ignore[call-overload]
                service,
                region_name=self.region,
                config=client_config(),
            )
        return self._clients[service]

    @property
    def ec2(self) -> EC2Client:
        return self._get("ec2")

    @property
    def ssm(self) -> SSMClient:
        return self._get("ssm")

    @property
    def autoscaling(self) -> AutoScalingClient:
        return self._get("autoscaling")

    @property
    def batch(self) -> BatchClient:
        return self._get("batch")

    @property
    def emr(self) -> EMRClient:
        return self._get("emr")

    @property
    def sqs(self) -> SQSClient:
        return self._get("sqs")

    @property
    def rbin(self) -> RecycleBinClient:
        return self._get("rbin")

    @property
    def dynamodb(self) -> DynamoDBClient:
        return self._get("dynamodb")

    @property
    def sts(self) -> STSClient:
        return self._get("sts")


class ClientFactory:
    """RegionClients per region, shared by one run (the engine acts on several regions from the CLI)."""

    def __init__(self, session: boto3.Session | None = None) -> None:
        self._session = session
        self._regions: dict[str, RegionClients] = {}

    def __call__(self, region: str) -> RegionClients:
        if region not in self._regions:
            self._regions[region] = RegionClients(region, self._session)
        return self._regions[region]
