"""What a failed storage request means, in one line that names the location, the reason
and the fix, and never a credential.

s3fs and botocore already retry what is worth retrying (throttling such as 503 SlowDown,
5xx answers, connection resets, timeouts); an error that reaches us has outlasted those
retries or is not transient at all. Two kinds come out of here:

  StorageError        the store refused (credentials, permissions, missing bucket, any
                      other answer); retrying the same request will not help
  StorageUnavailable  the store could not be reached or kept failing; the same command
                      can succeed later. An OSError, so Ray retries tasks that hit it.

Both are JobErrors (exit 3) while the job runs; the planner turns them into InputErrors
(exit 2), since there they are found before any work starts. A missing object stays a
FileNotFoundError: that is an answer, not a failure.
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager

from nvfp4_ray.errors import InputError, JobError

_CREDENTIALS_FIX = (
    "check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, "
    "AWS_PROFILE, or the instance role) and that they may access this path"
)
_DENIED = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
    "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem", "403",
}  # fmt: skip
_TRANSIENT = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed", "ServiceUnavailable",
    "InternalError", "500", "502", "503", "504",
}  # fmt: skip


class StorageError(JobError):
    """The object store refused a request; the message says why and what to change."""


class StorageUnavailable(StorageError, ConnectionError):
    """The object store could not be reached or kept failing; running again can help."""


def error_code(exc: BaseException) -> str:
    """The S3 error code behind an exception (s3fs keeps botocore's error as the cause)."""
    for candidate in (exc, exc.__cause__, exc.__context__):
        response = getattr(candidate, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", ""))
    return ""


def _message(exc: BaseException) -> str:
    from nvfp4_ray.io.storage import redact

    text = str(exc).strip().splitlines()
    return redact(text[0] if text and text[0] else type(exc).__name__)


def missing_bucket(where: str, bucket: str) -> StorageError:
    return StorageError(f"{where}: bucket {bucket!r} does not exist; create it or correct the URL")


def translate(exc: Exception, where: str, bucket: str) -> Exception:
    """The exception to raise instead of ``exc``, raised by a request on ``where``."""
    import botocore.exceptions

    if isinstance(exc, (InputError, JobError)):
        return exc
    code = error_code(exc)
    if code == "NoSuchBucket":
        return missing_bucket(where, bucket)
    if isinstance(exc, FileNotFoundError):
        return exc
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return StorageError(f"{where}: no credentials found; {_CREDENTIALS_FIX}")
    if code in _DENIED or isinstance(exc, PermissionError):
        reason = f"{code}: {_message(exc)}" if code and code not in _message(exc) else _message(exc)
        return StorageError(f"{where}: access denied ({reason}); {_CREDENTIALS_FIX}")
    if code in _TRANSIENT:
        return StorageUnavailable(
            f"{where}: the object store kept failing ({code}: {_message(exc)}); run the same command again later"
        )
    if isinstance(exc, (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError, ConnectionError, TimeoutError)):
        return StorageUnavailable(
            f"{where}: cannot reach the object store ({_message(exc)}); check AWS_ENDPOINT_URL and that the store is up, "
            "then run the same command again"
        )
    if isinstance(exc, asyncio.TimeoutError) or type(exc).__module__.startswith("aiohttp"):
        return StorageUnavailable(f"{where}: the connection to the object store failed ({_message(exc)}); run again")
    return StorageError(f"{where}: {type(exc).__name__}: {_message(exc)}")


@contextmanager
def as_input_errors():
    """Storage failures found while planning are bad input (exit 2): nothing has started."""
    try:
        yield
    except StorageError as exc:
        raise InputError(str(exc)) from None
