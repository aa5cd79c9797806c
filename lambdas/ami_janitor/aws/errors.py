"""AWS failures as the janitor reports them: one tuple to catch, the error code, one line of text."""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError
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


# Answers a later try may not meet again: throttling past the SDK's retries, AWS's own faults.
_PASSING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "Unavailable",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)


def is_passing(error: BaseException) -> bool:
    """Whether trying again may succeed: a throttle, a 5xx, a lost or unreadable answer (a refusal of
    the request itself, say AccessDenied or an invalid parameter, is met again)."""
    if isinstance(error, ClientError):
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return error_code(error) in _PASSING_CODES or status >= 500
    return isinstance(error, (BotoCoreError, ResponseParserError))
