"""Which AWS failures a later try may not meet again: the AMI event is tried again only for those."""

from __future__ import annotations

import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
)

from ami_janitor.aws.errors import PASSING_CODES, PASSING_FAILURES, is_passing


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
    )


@pytest.mark.parametrize(
    ("error", "passing"),
    [
        (client_error("RequestLimitExceeded", 503), True),
        (client_error("ThrottlingException", 400), True),
        (client_error("InternalError", 500), True),
        (client_error("SomethingNew", 502), True),
        (client_error("EC2ThrottledException", 400), True),
        (client_error("PriorRequestNotComplete", 400), True),
        (client_error("ExpiredToken", 400), True),
        (ReadTimeoutError(endpoint_url="https://ec2.us-east-1.amazonaws.com/"), True),
        (EndpointConnectionError(endpoint_url="https://ec2.us-east-1.amazonaws.com/"), True),
        (client_error("OperationNotPermitted", 400), False),
        (client_error("UnauthorizedOperation", 403), False),
        (client_error("InvalidAMIID.NotFound", 400), False),
        (ValueError("no ledger table"), False),
        (ParamValidationError(report="Missing required parameter"), False),
        (NoCredentialsError(), False),
    ],
)
def test_a_throttle_a_5xx_or_a_lost_answer_may_pass_a_refusal_does_not(
    error: BaseException, passing: bool
) -> None:
    assert is_passing(error) is passing


def test_every_code_and_failure_the_sdks_standard_retries_take_may_pass() -> None:
    """The installed botocore's own lists (private: compared here, so an upgrade that adds one fails)."""
    from botocore.retries.standard import ThrottledRetryableChecker, TransientRetryableChecker

    sdk = {
        *ThrottledRetryableChecker._THROTTLED_ERROR_CODES,  # type: ignore[attr-defined]
        *TransientRetryableChecker._TRANSIENT_ERROR_CODES,  # type: ignore[attr-defined]
    }
    assert sdk <= PASSING_CODES
    assert set(TransientRetryableChecker._TRANSIENT_EXCEPTION_CLS) <= set(PASSING_FAILURES)  # type: ignore[attr-defined]
    assert all(status >= 500 for status in TransientRetryableChecker._TRANSIENT_STATUS_CODES)  # type: ignore[attr-defined]
