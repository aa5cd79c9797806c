"""The environment contract between the stacks and the Lambda handlers: names live here only."""

from __future__ import annotations

# Where the validated policy sits inside the code asset (the functions read JSON, no YAML parser).
POLICY_FILE_NAME = "policy.json"
LAMBDA_TASK_ROOT = "/var/task"
POLICY_PATH_IN_LAMBDA = f"{LAMBDA_TASK_ROOT}/{POLICY_FILE_NAME}"

# Variable names.
AMI_JANITOR_CONFIG = "AMI_JANITOR_CONFIG"
POWERTOOLS_SERVICE_NAME = "POWERTOOLS_SERVICE_NAME"
POWERTOOLS_METRICS_NAMESPACE = "POWERTOOLS_METRICS_NAMESPACE"
LOG_LEVEL = "LOG_LEVEL"
PYDANTIC_DISABLE_PLUGINS = "PYDANTIC_DISABLE_PLUGINS"
REPORT_BUCKET = "REPORT_BUCKET"
TOPIC_ARN = "TOPIC_ARN"
REPLICATION_QUEUE_URL = "REPLICATION_QUEUE_URL"
AMI_EVENTS_QUEUE_URL = "AMI_EVENTS_QUEUE_URL"
WORK_QUEUE_URL = "WORK_QUEUE_URL"

# Values shared by every function. Powertools adds the dimension service=<service name> to each
# metric by default, so the alarms below use the same pair.
SERVICE_NAME = "ami-janitor"
METRICS_NAMESPACE = "AmiJanitor"
DEFAULT_LOG_LEVEL = "INFO"
# The functions use no pydantic plugin. Without this, the first validator pydantic builds looks for
# plugins in the entry points of every installed distribution, at every cold start.
NO_PYDANTIC_PLUGINS = "__all__"

# Metrics the handlers emit (Powertools, namespace METRICS_NAMESPACE, dimension service=SERVICE_NAME).
METRIC_ACTIONS_FAILED = "ActionsFailed"
METRIC_REGION_SKIPPED = "RegionSkipped"

# Handler entry points inside the asset.
SCHEDULED_HANDLER = "ami_janitor.handlers.scheduled.handler"
AMI_EVENT_HANDLER = "ami_janitor.handlers.ami_event.handler"
REPLICATE_HANDLER = "ami_janitor.handlers.replicate.handler"
BAKE_HANDLER = "ami_janitor.handlers.bake.handler"
SLICE_HANDLER = "ami_janitor.handlers.slices.handler"


def common_environment(*, log_level: str = DEFAULT_LOG_LEVEL) -> dict[str, str]:
    """Variables every function gets; each construct adds the ones for its own resources."""
    return {
        AMI_JANITOR_CONFIG: POLICY_PATH_IN_LAMBDA,
        POWERTOOLS_SERVICE_NAME: SERVICE_NAME,
        POWERTOOLS_METRICS_NAMESPACE: METRICS_NAMESPACE,
        LOG_LEVEL: log_level,
        PYDANTIC_DISABLE_PLUGINS: NO_PYDANTIC_PLUGINS,
    }
