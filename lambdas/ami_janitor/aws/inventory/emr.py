"""EMR clusters still alive: the custom AMIs (`CustomAmiId`) of the cluster, its instance groups or
its instance fleets."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ami_janitor.aws.inventory.claims import Claim, claim
from ami_janitor.aws.inventory.reading import Raw, items, source

if TYPE_CHECKING:
    from mypy_boto3_emr import EMRClient

PERMISSIONS: list[str] = [
    "elasticmapreduce:DescribeCluster",
    "elasticmapreduce:ListClusters",
    "elasticmapreduce:ListInstanceFleets",
    "elasticmapreduce:ListInstanceGroups",
]

_LIVE_STATES = ["STARTING", "BOOTSTRAPPING", "RUNNING", "WAITING"]
_KIND = "emr-cluster"


def read_emr_clusters(emr: EMRClient) -> list[Claim]:
    with source("elasticmapreduce:ListClusters"):
        cluster_ids = [
            str(c["Id"]) for c in items(emr, "list_clusters", "Clusters", ClusterStates=_LIVE_STATES)
        ]
    claims: list[Claim] = []
    for cluster_id in cluster_ids:
        with source("elasticmapreduce:DescribeCluster"):
            cluster = emr.describe_cluster(ClusterId=cluster_id)["Cluster"]
        claims += _cluster(emr, cluster_id, cluster)
    return claims


def _cluster(emr: EMRClient, cluster_id: str, cluster: Raw) -> list[Claim]:
    subject = f"EMR cluster {cluster_id}"
    cluster_ami = cluster.get("CustomAmiId")
    claims = claim(cluster_ami, _KIND, cluster_id, f"{subject} (CustomAmiId)")
    # An instance group or fleet names its own AMI only where it differs from the cluster's.
    if cluster.get("InstanceCollectionType") == "INSTANCE_FLEET":
        with source("elasticmapreduce:ListInstanceFleets"):
            for fleet in items(emr, "list_instance_fleets", "InstanceFleets", ClusterId=cluster_id):
                for spec in fleet.get("InstanceTypeSpecifications") or []:
                    if spec.get("CustomAmiId") != cluster_ami:
                        detail = f"{subject} (instance fleet {fleet.get('Id')} CustomAmiId)"
                        claims += claim(spec.get("CustomAmiId"), _KIND, cluster_id, detail)
        return claims
    with source("elasticmapreduce:ListInstanceGroups"):
        for group in items(emr, "list_instance_groups", "InstanceGroups", ClusterId=cluster_id):
            if group.get("CustomAmiId") != cluster_ami:
                detail = f"{subject} (instance group {group.get('Id')} CustomAmiId)"
                claims += claim(group.get("CustomAmiId"), _KIND, cluster_id, detail)
    return claims
