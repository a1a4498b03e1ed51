"""Errors a user can cause or fix, each carrying the exit code the CLI ends with (README: Troubleshooting).

The CLI prints any PipelineError as one `error:` line and exits with its exit_code; anything else is
a bug and keeps its traceback. Errors of the libraries below us (botocore, Ray) that mean something a
user can act on are turned into ours by `as_pipeline_error`.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1


class PipelineError(Exception):
    """Something the user can fix; the message says what, where and what to do."""

    exit_code = EXIT_FAILED


class SettingsError(PipelineError, ValueError):
    """A setting is unknown, out of range, or cannot work with the model, the device or the input."""

    exit_code = 2


class NoInputError(PipelineError, FileNotFoundError):
    """The input URL matched no shard."""

    exit_code = 3


class OutputConflictError(PipelineError, ValueError):
    """The output holds embeddings made with other settings or from other inputs."""

    exit_code = 4


class ModelError(PipelineError, RuntimeError):
    """The checkpoint could not be found, fetched, trusted or reproduced faithfully."""

    exit_code = 5


class BadInputError(PipelineError, ValueError):
    """A shard or row that cannot be read, in strict mode; the message names the file and row."""

    exit_code = 6


class StorageUnreachableError(PipelineError, ConnectionError):
    """Object storage did not answer after retries; committed work is kept and a re-run resumes."""

    exit_code = 7


class IncompleteRunError(PipelineError):
    """The job finished, but some input was not embedded: files failed part way, too many dead letters,
    or nothing at all was embedded."""

    exit_code = 8


class StorageAccessError(PipelineError, PermissionError):
    """Object storage or a folder refused access: no credentials, wrong ones, or no permission."""

    exit_code = 9


class TargetUnreachableError(PipelineError, ConnectionError):
    """A sync target did not answer or refused the credentials."""

    exit_code = 11


class TargetConflictError(PipelineError, ValueError):
    """A sync target holds something else: a table of another shape, or another output's rows."""

    exit_code = 12


class TargetMismatchError(PipelineError):
    """A sync finished, but the target's rows differ from the output's current view."""

    exit_code = 13


EXIT_CODES = {
    cls.exit_code: cls
    for cls in (
        PipelineError,
        SettingsError,
        NoInputError,
        OutputConflictError,
        ModelError,
        BadInputError,
        StorageUnreachableError,
        IncompleteRunError,
        StorageAccessError,
        TargetUnreachableError,
        TargetConflictError,
        TargetMismatchError,
    )
}

# botocore error codes that mean the credentials themselves are wrong, not that one object is private.
_BAD_CREDENTIAL_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken")
CREDENTIAL_SOURCES = (
    "tried: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws/credentials, web identity and "
    "instance or container roles"
)


def as_pipeline_error(err: BaseException) -> PipelineError | None:
    """Ours as it is; a storage library's error that a user can act on as ours; None for anything else."""
    if isinstance(err, PipelineError):
        return err
    try:
        from botocore import exceptions as boto
    except ImportError:  # no S3 support installed, so no S3 errors either
        boto = None
    if boto is not None:
        if isinstance(err, (boto.NoCredentialsError, boto.PartialCredentialsError)):
            return StorageAccessError(f"no usable S3 credentials ({err}); {CREDENTIAL_SOURCES}; or pass --anon")
        if isinstance(err, (boto.EndpointConnectionError, boto.ConnectTimeoutError)):
            return StorageUnreachableError(
                f"{err}; committed work is kept: re-run the same command once storage answers"
            )
        if isinstance(err, boto.ClientError) and err.response.get("Error", {}).get("Code") in _BAD_CREDENTIAL_CODES:
            return StorageAccessError(f"S3 refused the credentials ({err}); {CREDENTIAL_SOURCES}")
    if isinstance(err, PermissionError):
        return StorageAccessError(f"access denied: {err}; check the credentials or permissions for it")
    return None
