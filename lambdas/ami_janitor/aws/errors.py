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
