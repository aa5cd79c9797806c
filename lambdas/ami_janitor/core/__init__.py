"""The pure core: the policy, the models, the planner, and what rotation, shares, copies and bakes
should change. Nothing here imports boto3, botocore or Powertools (an import-linter contract checks it)."""
