"""Errors a user can cause or fix, each carrying the exit code the CLI ends with (README: Troubleshooting).

The CLI prints any PipelineError as one `error:` line and exits with its exit_code; anything else is
a bug and keeps its traceback. Errors of the libraries below us (botocore, Ray) that mean something a
user can act on are turned into ours by `as_pipeline_error`.
"""

from __future__ import annotations

import sys

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
# Where each store's library looks for credentials, in its order: what an error says was tried.
S3_CREDENTIALS = (
    "tried: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws/credentials, web identity and "
    "instance or container roles"
)
GCS_CREDENTIALS = (
    "tried: the file GOOGLE_APPLICATION_CREDENTIALS names (when set, nothing else), else gcloud's "
    "application-default login, the metadata server (GKE workload identity, a VM's service account), then "
    "anonymous access"
)
AZURE_CREDENTIALS = (
    "tried: AZURE_STORAGE_CONNECTION_STRING; AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY, "
    "AZURE_STORAGE_SAS_TOKEN or AZURE_STORAGE_CLIENT_ID/_SECRET/TENANT_ID; then DefaultAzureCredential "
    "(environment, workload identity, managed identity, Azure CLI login)"
)
_RERUN = "committed work is kept: re-run the same command once storage answers"


def as_pipeline_error(err: BaseException) -> PipelineError | None:
    """Ours as it is; a storage library's error that a user can act on as ours; None for anything else."""
    if isinstance(err, PipelineError):
        return err
    for store_error in (_s3_error, _gcs_error, _azure_error):
        found = store_error(err)
        if found is not None:
            return found
    if isinstance(err, PermissionError):
        return StorageAccessError(f"access denied: {err}; check the credentials or permissions for it")
    return None


def _loaded(module: str):
    """A library's module if this process imported it: an error of a library never loaded cannot occur."""
    return sys.modules.get(module)


def _s3_error(err: BaseException) -> PipelineError | None:
    boto = _loaded("botocore.exceptions")
    if boto is None:
        return None
    if isinstance(err, (boto.NoCredentialsError, boto.PartialCredentialsError)):
        return StorageAccessError(f"no usable S3 credentials ({err}); {S3_CREDENTIALS}; or pass --anon")
    if isinstance(err, (boto.EndpointConnectionError, boto.ConnectTimeoutError)):
        return StorageUnreachableError(f"{err}; {_RERUN}")
    if isinstance(err, boto.ClientError) and err.response.get("Error", {}).get("Code") in _BAD_CREDENTIAL_CODES:
        return StorageAccessError(f"S3 refused the credentials ({err}); {S3_CREDENTIALS}")
    return None


def _gcs_error(err: BaseException) -> PipelineError | None:
    auth, gcsfs_retry = _loaded("google.auth.exceptions"), _loaded("gcsfs.retry")
    if auth is not None and isinstance(err, auth.DefaultCredentialsError):
        return StorageAccessError(f"no usable GCS credentials ({_first_line(err)}); {GCS_CREDENTIALS}")
    if auth is not None and isinstance(err, auth.RefreshError):
        return StorageAccessError(f"GCS refused the credentials ({_first_line(err)}); {GCS_CREDENTIALS}")
    if gcsfs_retry is not None and isinstance(err, gcsfs_retry.HttpError) and err.code == 401:
        return StorageAccessError(f"GCS refused the credentials ({_first_line(err)}); {GCS_CREDENTIALS}")
    return None


def _azure_error(err: BaseException) -> PipelineError | None:
    azure = _loaded("azure.core.exceptions")
    if azure is None:
        return None
    if isinstance(err, azure.ClientAuthenticationError) or (
        isinstance(err, azure.HttpResponseError) and err.status_code in (401, 403)
    ):
        code = getattr(err, "error_code", None) or err.status_code
        code = getattr(code, "value", code)  # the SDK's enum of error codes, as Azure spells them
        return StorageAccessError(
            f"Azure Blob refused the credentials or access ({code}: {_first_line(err)}); {AZURE_CREDENTIALS}"
        )
    if isinstance(err, azure.ServiceRequestError):
        return StorageUnreachableError(f"Azure Blob did not answer ({_first_line(err)}); {_RERUN}")
    return None


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
