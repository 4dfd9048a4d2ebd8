"""Fetch a Kaggle dataset archive, verify it, and unpack it into an empty folder.

The download stage calls :func:`download_kaggle_dataset` with a fresh empty folder and renames that
folder into place only after success, so this module never touches the final location. It returns
a record (slug, version, time, archive size and SHA-256) that the stage stores next to the data.

Why kagglesdk's ``KaggleClient`` and not ``kaggle.KaggleApi``: both are the official client (the
``kaggle`` CLI is a thin layer over kagglesdk), but in kaggle 2.2.5 ``import kaggle`` authenticates at
import time (printing help and, with an access token, calling the network), ``KaggleApi`` creates its
config folder when the class is defined, and ``KaggleApi.build_kaggle_client`` hard-wires the endpoint
to production, ignoring ``KAGGLE_API_ENVIRONMENT``. ``KaggleClient`` honours that variable (``TEST``
means http://localhost:7777), which is what lets the tests run against a local fake server.

Requests made for one download (endpoint = https://api.kaggle.com in production):

* ``POST {endpoint}/v1/datasets.DatasetApiService/DownloadDataset`` (``/api/v1/...`` outside
  production) with JSON ``{"ownerSlug", "datasetSlug"[, "datasetVersionNumber"]}`` and HTTP Basic auth
  (username, key) or ``Authorization: Bearer <token>``; Kaggle answers with a redirect to the archive.
* ``GET`` of the redirect target (requests follows it), streamed to a temporary zip.

Credentials are looked up in the same places and order as kaggle 2.2.5 (see
:func:`find_kaggle_credentials`), before any client code is imported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

logger = logging.getLogger(__name__)

# Same rule as KaggleSource.slug in config.py: owner/dataset, no version suffix.
SLUG_PATTERN = re.compile(r"^[\w.-]+/[\w.-]+$")

# (connect, read) seconds applied to every HTTP request. kagglesdk sends without any timeout, so a
# stalled server would otherwise hang the pipeline forever.
HTTP_TIMEOUT_S: tuple[float, float] = (15.0, 120.0)

_CHUNK_BYTES = 1 << 20
_TOKEN_SETTINGS_URL = "https://www.kaggle.com/settings"


class KaggleCredentialsError(RuntimeError):
    """No usable Kaggle API credentials were found (or a credentials file is malformed)."""


class KaggleDownloadError(RuntimeError):
    """The dataset could not be downloaded, verified or unpacked; the message names the slug."""


@dataclass(frozen=True)
class _KaggleAuth:
    """Credentials resolved for one download; exactly one of (username + key), token, oauth_file."""

    source: str
    username: str | None = None
    key: str | None = None
    token: str | None = None
    oauth_file: Path | None = None


# --------------------------------------------------------------------------- credentials


def kaggle_json_path(environ: Mapping[str, str], home: Path) -> Path:
    """Return where the kaggle client looks for ``kaggle.json`` (rules of ``KaggleApi.config_dir``).

    Args:
        environ: environment variables (``KAGGLE_CONFIG_DIR``, ``XDG_CONFIG_HOME`` are read).
        home: the user's home folder.
    """
    config_dir = environ.get("KAGGLE_CONFIG_DIR")
    if config_dir:
        return Path(config_dir) / "kaggle.json"
    legacy_dir = home / ".kaggle"
    # kaggle 2.x follows XDG on Linux, but keeps ~/.kaggle when it already exists.
    if sys.platform.startswith("linux") and not legacy_dir.exists():
        xdg_config = environ.get("XDG_CONFIG_HOME") or str(home / ".config")
        return Path(xdg_config) / "kaggle" / "kaggle.json"
    return legacy_dir / "kaggle.json"


def _read_token_file(path: Path) -> str | None:
    """Return the stripped token in ``path``, or None when the file is missing or blank (as kagglesdk)."""
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8").strip() or None


def _read_json_credentials(path: Path) -> dict[str, Any]:
    """Parse a credentials JSON file; {} when it is missing.

    The kaggle client silently ignores a malformed file and then reports "no credentials", which
    hides the typo; here it is an error naming the file.
    """
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except json.JSONDecodeError as exc:
        raise KaggleCredentialsError(f"Kaggle credentials file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise KaggleCredentialsError(
            f"Kaggle credentials file {path} must hold a JSON object, got {type(data).__name__}"
        )
    return data


def _access_token_auth(environ: Mapping[str, str], home: Path) -> _KaggleAuth | None:
    """Find an API token: ``KAGGLE_API_TOKEN`` (the token or a file holding it), then ~/.kaggle/access_token."""
    value = environ.get("KAGGLE_API_TOKEN")
    if value:
        # kagglesdk treats the value as a path when such a file exists, and stops looking either way.
        if Path(value).exists():
            token = _read_token_file(Path(value))
            return _KaggleAuth(f"token file {value} (KAGGLE_API_TOKEN)", token=token) if token else None
        return _KaggleAuth("environment variable KAGGLE_API_TOKEN", token=value)
    for name in ("access_token", "access_token.txt"):
        path = home / ".kaggle" / name
        token = _read_token_file(path)
        if token:
            return _KaggleAuth(f"token file {path}", token=token)
    return None


def _api_key_auth(environ: Mapping[str, str], home: Path) -> _KaggleAuth | None:
    """Find a legacy username + key: kaggle.json, each value overridable by KAGGLE_USERNAME / KAGGLE_KEY."""
    path = kaggle_json_path(environ, home)
    from_file = _read_json_credentials(path)
    username = environ.get("KAGGLE_USERNAME") or from_file.get("username")
    key = environ.get("KAGGLE_KEY") or from_file.get("key")
    if not (username and key):
        return None
    from_env = [name for name in ("KAGGLE_USERNAME", "KAGGLE_KEY") if environ.get(name)]
    if len(from_env) == 2:
        source = "environment variables KAGGLE_USERNAME and KAGGLE_KEY"
    elif from_env:
        source = f"{path} with {from_env[0]} from the environment"
    else:
        source = str(path)
    return _KaggleAuth(source, username=str(username), key=str(key))


def _oauth_auth(home: Path) -> _KaggleAuth | None:
    """Find OAuth credentials saved by ``kaggle auth login`` (~/.kaggle/credentials.json with a refresh token)."""
    path = home / ".kaggle" / "credentials.json"
    if not _read_json_credentials(path).get("refresh_token"):
        return None
    return _KaggleAuth(f"OAuth credentials {path} (kaggle auth login)", oauth_file=path)


def _resolve_kaggle_auth(environ: Mapping[str, str], home: Path) -> _KaggleAuth | None:
    """Return the credentials kaggle 2.2.5 would use, in its order (token, key, OAuth), or None."""
    return _access_token_auth(environ, home) or _api_key_auth(environ, home) or _oauth_auth(home)


def find_kaggle_credentials(environ: Mapping[str, str] | None = None, home: Path | None = None) -> str | None:
    """Say where Kaggle API credentials would be taken from, without importing the client.

    Accepted, in the kaggle client's order: ``KAGGLE_API_TOKEN`` (a token or a path to one),
    ``~/.kaggle/access_token[.txt]``, ``kaggle.json`` (``$KAGGLE_CONFIG_DIR``, ``~/.kaggle`` or
    ``~/.config/kaggle``) with ``KAGGLE_USERNAME`` / ``KAGGLE_KEY`` overriding its values, and
    ``~/.kaggle/credentials.json`` from ``kaggle auth login``.

    Args:
        environ: environment variables; defaults to ``os.environ``.
        home: home folder; defaults to ``Path.home()``.

    Returns:
        A short description such as ``"environment variables KAGGLE_USERNAME and KAGGLE_KEY"``,
        or None when nothing usable is found.

    Raises:
        KaggleCredentialsError: a credentials file exists but is not valid JSON.
    """
    environ = os.environ if environ is None else environ
    home = Path.home() if home is None else Path(home)
    auth = _resolve_kaggle_auth(environ, home)
    return None if auth is None else auth.source


def _missing_credentials_message(slug: str, kaggle_json: Path) -> str:
    """Explain the two ways to provide credentials, and the offline alternative."""
    return (
        f"No Kaggle API credentials found, so dataset {slug!r} cannot be downloaded. Either:\n"
        f"  - create an API token on {_TOKEN_SETTINGS_URL} (API > Create New Token), save the "
        f"kaggle.json it gives you as {kaggle_json} and run `chmod 600 {kaggle_json}`; or\n"
        "  - export KAGGLE_USERNAME=<your username> and KAGGLE_KEY=<your key> "
        "(KAGGLE_API_TOKEN=<token> also works).\n"
        "To run the pipeline offline on the built-in phantom data instead, use `make demo`."
    )


# --------------------------------------------------------------------------- download


def _check_download_arguments(slug: str, version: int | None, dest: Path) -> None:
    """Raise ValueError / NotADirectoryError naming the bad argument; nothing is fetched before this."""
    if not isinstance(slug, str) or not SLUG_PATTERN.fullmatch(slug):
        raise ValueError(
            f"Kaggle dataset slug must look like 'owner/dataset' "
            f"(e.g. 'masoudnickparvar/brain-tumor-mri-dataset'), got {slug!r}"
        )
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise ValueError(f"Kaggle dataset version must be None (latest) or an integer >= 1, got {version!r}")
    if not dest.is_dir():
        raise NotADirectoryError(f"download destination {dest} does not exist or is not a directory")
    if any(dest.iterdir()):
        raise ValueError(f"download destination {dest} must be an empty directory; it has files in it")


def _describe_dataset(slug: str, version: int | None) -> str:
    """Name the dataset and version for messages, e.g. ``owner/name version 3``."""
    return f"{slug} (latest version)" if version is None else f"{slug} version {version}"


class _TimeoutAdapter(HTTPAdapter):
    """An HTTPAdapter that applies a default timeout, since kagglesdk never passes one."""

    def __init__(self, timeout: tuple[float, float]):
        super().__init__()
        self._timeout = timeout

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self._timeout
        return super().send(request, **kwargs)


def _install_timeout(client: Any) -> None:
    """Mount :class:`_TimeoutAdapter` on the client's requests session (a kagglesdk internal)."""
    session = getattr(client.http_client(), "_session", None)
    if not isinstance(session, requests.Session):
        # Only the timeout is lost, the download still works; say so rather than fail.
        logger.warning("kagglesdk's HTTP session is not reachable; downloading without a socket timeout")
        return
    adapter = _TimeoutAdapter(HTTP_TIMEOUT_S)
    session.mount("http://", adapter)
    session.mount("https://", adapter)


def _oauth_access_token(oauth_file: Path) -> str:
    """Return a valid access token from ``kaggle auth login`` credentials, refreshing it if expired."""
    from kagglesdk import KaggleClient, KaggleCredentials

    with KaggleClient() as client:
        _install_timeout(client)
        credentials = KaggleCredentials.load(client=client, file_path=str(oauth_file))
        token = credentials.get_access_token() if credentials is not None else None
    if not token:
        raise KaggleCredentialsError(f"{oauth_file} holds no usable OAuth token; run `kaggle auth login` again")
    return token


def _stream_to_file(response: requests.Response, archive: Path) -> tuple[int, str]:
    """Write the streamed body to ``archive``; return its size in bytes and SHA-256 hex digest."""
    digest = hashlib.sha256()
    size = 0
    with archive.open("wb") as out:
        for chunk in response.iter_content(_CHUNK_BYTES):
            out.write(chunk)
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _fetch_archive(slug: str, version: int | None, auth: _KaggleAuth, archive: Path) -> tuple[int, str]:
    """Download the dataset zip to ``archive`` with kagglesdk; return (bytes, sha256).

    Imported here, after the credentials check, so that importing this module never loads the client.
    """
    from kagglesdk import KaggleClient
    from kagglesdk.datasets.types.dataset_api_service import ApiDownloadDatasetRequest

    token = _oauth_access_token(auth.oauth_file) if auth.oauth_file is not None else auth.token
    request = ApiDownloadDatasetRequest()
    request.owner_slug, request.dataset_slug = slug.split("/")
    request.dataset_version_number = version
    # env=None: kagglesdk then reads KAGGLE_API_ENVIRONMENT (production unless set).
    with KaggleClient(username=auth.username, password=auth.key, api_token=token) as client:
        _install_timeout(client)
        with client.datasets.dataset_api_client.download_dataset(request) as response:
            return _stream_to_file(response, archive)


def _endpoint_of(exc: BaseException) -> str:
    """Return scheme://host of the request that failed, for messages; a generic name if unknown."""
    request = getattr(exc, "request", None)
    url = getattr(request, "url", None)
    if not url:
        return "the Kaggle API"
    parts = urlsplit(url)
    return f"the Kaggle API at {parts.scheme}://{parts.netloc}"


def _client_failure_message(exc: Exception, slug: str, version: int | None, auth: _KaggleAuth) -> str:
    """Turn an exception raised by the client into one sentence a user can act on."""
    what = _describe_dataset(slug, version)
    response = getattr(exc, "response", None)
    if isinstance(exc, requests.HTTPError) and response is not None:
        status = response.status_code
        if status in (401, 403):
            return (
                f"Kaggle rejected the credentials from {auth.source} (HTTP {status}) while downloading {what}. "
                f"Check them or create a new token on {_TOKEN_SETTINGS_URL}; if the dataset has terms, "
                "accept them on its Kaggle page."
            )
        if status == 404:
            return (
                f"Kaggle dataset {what} was not found (HTTP 404). Check the slug (the owner/dataset part of "
                "https://www.kaggle.com/datasets/<owner>/<dataset>) and that the version exists."
            )
        return f"Kaggle answered HTTP {status} while downloading {what}: {exc}"
    if isinstance(exc, requests.ConnectionError):
        return (
            f"Could not reach {_endpoint_of(exc)} (or the connection broke) while downloading {what}: {exc}. "
            "Check the network or proxy; `make demo` runs offline on the built-in phantom data."
        )
    if isinstance(exc, requests.Timeout):
        connect_s, read_s = HTTP_TIMEOUT_S
        endpoint = _endpoint_of(exc)
        return (
            f"{endpoint[0].upper()}{endpoint[1:]} stopped answering while downloading {what} "
            f"(timeouts: connect {connect_s} s, read {read_s} s): {exc}"
        )
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return f"The connection broke before the whole archive of {what} arrived: {exc}"
    if isinstance(exc, requests.RequestException):
        return f"Downloading {what} from Kaggle failed ({type(exc).__name__}): {exc}"
    return f"The Kaggle client failed while downloading {what} ({type(exc).__name__}): {exc}"


def _unsafe_member_reason(name: str, dest_root: Path) -> str | None:
    """Say why extracting zip member ``name`` could write outside ``dest_root``, or None if it is safe."""
    parts = re.split(r"[\\/]", name)
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in parts:
        return "parent-directory component '..'"
    if not (dest_root / name).resolve().is_relative_to(dest_root):
        return "resolves outside the destination"
    return None


def _verify_archive(archive: Path, slug: str, dest_root: Path) -> None:
    """Raise KaggleDownloadError unless ``archive`` is a complete, CRC-clean zip with only safe paths."""
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            bad_member = zf.testzip()
    except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as exc:
        raise KaggleDownloadError(
            f"Archive downloaded for {slug} ({archive.stat().st_size} bytes) is not a valid zip "
            f"(truncated or corrupt download?): {exc}"
        ) from exc
    if bad_member is not None:
        raise KaggleDownloadError(f"Archive downloaded for {slug} is corrupt: CRC check failed for {bad_member!r}")
    if not names:
        raise KaggleDownloadError(f"Archive downloaded for {slug} is empty")
    for name in names:
        reason = _unsafe_member_reason(name, dest_root)
        if reason is not None:
            raise KaggleDownloadError(
                f"Archive downloaded for {slug} has an unsafe entry {name!r} ({reason}); refusing to extract it"
            )


def _extract_archive(archive: Path, dest: Path, slug: str) -> None:
    """Verify the zip, then extract every member into ``dest`` (left untouched if verification fails)."""
    dest_root = dest.resolve()
    _verify_archive(archive, slug, dest_root)
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest_root)
    except OSError as exc:
        raise KaggleDownloadError(f"Extracting the archive of {slug} into {dest} failed: {exc}") from exc


def download_kaggle_dataset(slug: str, version: int | None, dest: Path) -> dict:
    """Download a Kaggle dataset, verify the zip and extract it into the empty folder ``dest``.

    The zip goes to a temporary folder that is always removed. ``dest`` is filled only after the
    whole archive has been verified; on failure the caller discards it.

    Args:
        slug: ``owner/dataset``, e.g. ``masoudnickparvar/brain-tumor-mri-dataset``.
        version: dataset version number to fetch, or None for the latest.
        dest: an existing, empty directory.

    Returns:
        ``{"slug", "version", "downloaded_at" (UTC ISO-8601), "archive_bytes", "archive_sha256"}``.

    Raises:
        ValueError, NotADirectoryError: bad slug or version, or ``dest`` missing or not empty.
        KaggleCredentialsError: no credentials found (checked before any request).
        KaggleDownloadError: the request failed (rejected credentials, unknown dataset, unreachable
            API, ...), or the archive is corrupt, truncated or has paths escaping ``dest``.
    """
    dest = Path(dest)
    _check_download_arguments(slug, version, dest)
    home = Path.home()
    auth = _resolve_kaggle_auth(os.environ, home)
    if auth is None:
        raise KaggleCredentialsError(_missing_credentials_message(slug, kaggle_json_path(os.environ, home)))
    what = _describe_dataset(slug, version)
    logger.info("Downloading Kaggle dataset %s with credentials from %s", what, auth.source)
    with tempfile.TemporaryDirectory(prefix="kaggle-download-") as tmp:
        archive = Path(tmp) / f"{slug.split('/')[1]}.zip"
        try:
            archive_bytes, archive_sha256 = _fetch_archive(slug, version, auth, archive)
        except KaggleCredentialsError:
            raise
        except Exception as exc:  # the client boundary: whatever it raises becomes one specific error
            raise KaggleDownloadError(_client_failure_message(exc, slug, version, auth)) from exc
        downloaded_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        _extract_archive(archive, dest, slug)
    logger.info("Extracted %s: %d bytes, sha256 %s", slug, archive_bytes, archive_sha256)
    return {
        "slug": slug,
        "version": version,
        "downloaded_at": downloaded_at,
        "archive_bytes": archive_bytes,
        "archive_sha256": archive_sha256,
    }
