"""AWS failures as the janitor reports them: one tuple to catch, the error code, one line of text."""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError
from botocore.parsers import ResponseParserError

# ResponseParserError (an HTML error page where XML or JSON was due) is no BotoCoreError.
AWS_ERRORS = (ClientError, BotoCoreError, ResponseParserError)


def error_code(error: BaseException) -> str:
    """The AWS error code of a ClientError ("" for anything else, or when AWS named none)."""
    if not isinstance(error, ClientError):
        return ""
    return str(error.response.get("Error", {}).get("Code") or "")


def error_text(error: BaseException) -> str:
    """'Code: message' for an AWS answer, else the exception's own text (or its type), on one line (an
    unparsable answer's text quotes the page it got)."""
    if isinstance(error, ClientError):
        info = error.response.get("Error", {})
        text = f"{info.get('Code', 'Unknown')}: {info.get('Message', '')}".rstrip(": ")
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


# Answers a later try may not meet again: what the SDK's standard retry mode retries (its throttling
# and transient codes, statuses and failures: tests/unit/test_passing_errors.py compares them with the
# installed botocore), AWS's own faults, and an expired session's token (a new invocation has another).
PASSING_CODES = frozenset(
    {
        "BandwidthLimitExceeded",
        "EC2ThrottledException",
        "LimitExceededException",
        "PriorRequestNotComplete",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestThrottledException",
        "RequestTimeout",
        "RequestTimeoutException",
        "SlowDown",
        "ThrottledException",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
        "TransactionInProgressException",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "Unavailable",
        "TransactionConflictException",
        "ExpiredToken",
        "ExpiredTokenException",
    }
)
PASSING_FAILURES: tuple[type[Exception], ...] = (ConnectionError, HTTPClientError, ResponseParserError)


def is_passing(error: BaseException) -> bool:
    """Whether trying again may succeed: a throttle, a 5xx, a lost or unreadable answer. A refusal of
    the request itself (AccessDenied, an invalid parameter), a request the SDK refused to send or one
    without credentials is met again."""
    if isinstance(error, ClientError):
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return error_code(error) in PASSING_CODES or status >= 500
    return isinstance(error, PASSING_FAILURES)


def sent_again(error: BaseException) -> bool:
    """Whether the SDK sent the call more than once before this answer (botocore's RetryAttempts): an
    earlier attempt may have taken effect, its answer lost."""
    if not isinstance(error, ClientError):
        return False
    return int(error.response.get("ResponseMetadata", {}).get("RetryAttempts") or 0) > 0


# The answers that say the caller may not call at all there (an IAM or SCP deny, an opt-in region not
# enabled): lasting, whatever is asked.
_DENIED_CODES = frozenset(
    {"UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "AuthFailure", "OptInRequired"}
)


def is_denied(error: BaseException) -> bool:
    """Whether AWS refused the caller itself (trying again meets the same refusal until a policy or
    the account changes)."""
    return error_code(error) in _DENIED_CODES
