"""Tests of :mod:`braintumor.data.kaggle` against a fake Kaggle API on loopback.

Nothing inside the client is mocked: kagglesdk runs for real with ``KAGGLE_API_ENVIRONMENT=TEST``,
which points it at http://localhost:7777, where :class:`FakeKaggle` answers the two requests a
dataset download makes (the DownloadDataset call, then the redirect target) with a real zip built
here. Credentials are controlled through HOME, KAGGLE_CONFIG_DIR and environment variables.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import socket
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from braintumor.data import kaggle as kaggle_source
from braintumor.data.kaggle import (
    KaggleCredentialsError,
    KaggleDownloadError,
    download_kaggle_dataset,
    find_kaggle_credentials,
)

# kagglesdk's TEST environment is hard-wired to this port (kagglesdk/kaggle_env.py).
FAKE_PORT = 7777
DOWNLOAD_PATH = "/api/v1/datasets.DatasetApiService/DownloadDataset"
SLUG = "masoudnickparvar/brain-tumor-mri-dataset"
USERNAME, KEY = "tester", "0123456789abcdef"


# --------------------------------------------------------------------------- fake Kaggle API


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class FakeKaggle:
    """What the fake server serves, and the requests it received (in order)."""

    archive: bytes = b""
    api_status: int = 200  # status of the DownloadDataset call; 200 means redirect to the file
    declared_length: int | None = None  # Content-Length to claim for the file; None = true length
    stall: threading.Event | None = None  # when set, the file request waits on it before answering
    requests: list[RecordedRequest] = field(default_factory=list)

    def paths(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.requests]


def _make_handler(fake: FakeKaggle) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: one request per connection, closed after the answer, so the client never waits
        # on a kept-alive socket.
        protocol_version = "HTTP/1.0"

        def log_message(self, format, *args):  # keep pytest output clean
            pass

        def _record(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            fake.requests.append(RecordedRequest(self.command, self.path, dict(self.headers), body))

        def _send(self, status: int, body: bytes, content_type: str, location: str | None = None,
                  declared_length: int | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body) if declared_length is None else declared_length))
            if location is not None:
                self.send_header("Location", location)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            self._record()
            if self.path != DOWNLOAD_PATH:
                self._send(404, json.dumps({"code": 404, "message": "unknown RPC"}).encode(), "application/json")
            elif fake.api_status != 200:
                # Kaggle's error shape; kagglesdk raises HTTPError from it.
                error = {"code": fake.api_status, "message": f"fake error {fake.api_status}"}
                self._send(fake.api_status, json.dumps(error).encode(), "application/json")
            else:
                # Like Kaggle: a redirect to where the archive is stored.
                location = f"http://localhost:{FAKE_PORT}/files/{fake.requests[-1].json()['datasetSlug']}.zip"
                self._send(302, b"", "text/plain", location=location)

        def do_GET(self):
            self._record()
            if not self.path.startswith("/files/"):
                self._send(404, b"not found", "text/plain")
                return
            if fake.stall is not None:
                fake.stall.wait(timeout=10)
                return  # close without answering
            self._send(200, fake.archive, "application/zip", declared_length=fake.declared_length)

    return Handler


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def fake_kaggle(kaggle_env):
    """Run :class:`FakeKaggle` on 127.0.0.1:7777 for one test."""
    fake = FakeKaggle(archive=build_zip(SAMPLE_FILES))
    try:
        server = ThreadingHTTPServer(("127.0.0.1", FAKE_PORT), _make_handler(fake))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            pytest.fail(
                f"port {FAKE_PORT} is busy; kagglesdk's TEST endpoint is fixed to localhost:{FAKE_PORT}, "
                f"so stop whatever listens there (`ss -ltnp | grep {FAKE_PORT}`) and rerun"
            )
        raise
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield fake
    if fake.stall is not None:
        fake.stall.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


# --------------------------------------------------------------------------- environment and data


@pytest.fixture
def kaggle_env(tmp_path, monkeypatch):
    """Isolate credentials and temp files in tmp_path and point kagglesdk at the fake server.

    Returns the home folder; no credentials exist until a test writes some.
    """
    home = tmp_path / "home"
    (home / ".kaggle").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(home / ".kaggle"))
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "TEST")
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_KERNEL_RUN_TYPE", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    # A proxy from the environment would swallow requests meant for loopback.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    # Where the module's temporary zip goes, so tests can check it was removed.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return home


@pytest.fixture
def api_key_env(monkeypatch, kaggle_env):
    monkeypatch.setenv("KAGGLE_USERNAME", USERNAME)
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    return kaggle_env


@pytest.fixture
def dest(tmp_path) -> Path:
    folder = tmp_path / "out" / "dest.partial"
    folder.mkdir(parents=True)
    return folder


def _tiny_image(suffix: str, value: int) -> bytes:
    ok, encoded = cv2.imencode(suffix, np.full((8, 8), value, np.uint8))
    assert ok
    return encoded.tobytes()


SAMPLE_FILES = {
    "Training/glioma/Tr-gl_0001.jpg": _tiny_image(".jpg", 40),
    "Training/glioma/Tr-gl_0002.jpg": _tiny_image(".jpg", 90),
    "Testing/notumor/Te-no_0001.png": _tiny_image(".png", 200),
}


def build_zip(files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _assert_nothing_left(dest: Path) -> None:
    assert list(dest.iterdir()) == [], "dest must stay empty after a failure"
    assert list(Path(tempfile.tempdir).iterdir()) == [], "temporary zip was left behind"


# --------------------------------------------------------------------------- downloads


def test_download_extracts_archive_and_returns_record(fake_kaggle, api_key_env, dest):
    before = datetime.now(timezone.utc).replace(microsecond=0)

    record = download_kaggle_dataset(SLUG, None, dest)

    assert _files_under(dest) == SAMPLE_FILES
    assert record["slug"] == SLUG and record["version"] is None
    assert record["archive_bytes"] == len(fake_kaggle.archive)
    assert record["archive_sha256"] == hashlib.sha256(fake_kaggle.archive).hexdigest()
    downloaded_at = datetime.fromisoformat(record["downloaded_at"])
    assert downloaded_at.utcoffset() == timedelta(0)
    assert before <= downloaded_at <= datetime.now(timezone.utc)
    assert set(record) == {"slug", "version", "downloaded_at", "archive_bytes", "archive_sha256"}
    assert list(Path(tempfile.tempdir).iterdir()) == []


def test_download_sends_slug_and_basic_auth_then_follows_redirect(fake_kaggle, api_key_env, dest):
    download_kaggle_dataset(SLUG, None, dest)

    assert fake_kaggle.paths() == [("POST", DOWNLOAD_PATH), ("GET", "/files/brain-tumor-mri-dataset.zip")]
    api_call = fake_kaggle.requests[0]
    assert api_call.json() == {"ownerSlug": "masoudnickparvar", "datasetSlug": "brain-tumor-mri-dataset"}
    expected_auth = "Basic " + base64.b64encode(f"{USERNAME}:{KEY}".encode()).decode()
    assert api_call.headers["Authorization"] == expected_auth


def test_requested_version_reaches_server(fake_kaggle, api_key_env, dest):
    record = download_kaggle_dataset(SLUG, 3, dest)

    assert fake_kaggle.requests[0].json()["datasetVersionNumber"] == 3
    assert record["version"] == 3
    assert _files_under(dest) == SAMPLE_FILES


def _write_kaggle_json(home: Path) -> None:
    path = home / ".kaggle" / "kaggle.json"
    path.write_text(json.dumps({"username": USERNAME, "key": KEY}))
    path.chmod(0o600)


def _write_oauth_credentials(home: Path) -> None:
    expires = datetime.now(timezone.utc) + timedelta(hours=6)
    data = {
        "refresh_token": "refresh-1",
        "access_token": "oauth-access-1",
        "access_token_expiration": expires.isoformat(),
    }
    (home / ".kaggle" / "credentials.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    "setup, expected_auth",
    [
        (_write_kaggle_json, "Basic " + base64.b64encode(f"{USERNAME}:{KEY}".encode()).decode()),
        (lambda home: (home / ".kaggle" / "access_token").write_text("file-token-1\n"), "Bearer file-token-1"),
        (_write_oauth_credentials, "Bearer oauth-access-1"),
    ],
    ids=["kaggle.json", "access_token file", "oauth credentials.json"],
)
def test_each_credential_source_is_sent(fake_kaggle, kaggle_env, dest, setup, expected_auth):
    setup(kaggle_env)

    download_kaggle_dataset(SLUG, None, dest)

    assert fake_kaggle.requests[0].headers["Authorization"] == expected_auth


def test_api_token_env_is_sent_as_bearer(fake_kaggle, kaggle_env, dest, monkeypatch):
    monkeypatch.setenv("KAGGLE_API_TOKEN", "env-token-1")

    download_kaggle_dataset(SLUG, None, dest)

    assert fake_kaggle.requests[0].headers["Authorization"] == "Bearer env-token-1"


def test_missing_credentials_raise_before_any_request(fake_kaggle, kaggle_env, dest):
    with pytest.raises(KaggleCredentialsError) as caught:
        download_kaggle_dataset(SLUG, None, dest)

    message = str(caught.value)
    for expected in ("kaggle.json", "KAGGLE_USERNAME", "KAGGLE_KEY", "make demo", "chmod 600", "kaggle.com/settings"):
        assert expected in message
    assert str(kaggle_env / ".kaggle" / "kaggle.json") in message
    assert fake_kaggle.requests == []
    _assert_nothing_left(dest)


def test_server_error_is_download_error_and_leaves_nothing(fake_kaggle, api_key_env, dest):
    fake_kaggle.api_status = 500

    with pytest.raises(KaggleDownloadError, match="HTTP 500") as caught:
        download_kaggle_dataset(SLUG, None, dest)

    assert SLUG in str(caught.value)
    assert caught.value.__cause__ is not None, "the client's exception must be chained"
    _assert_nothing_left(dest)


def test_unknown_dataset_says_not_found(fake_kaggle, api_key_env, dest):
    fake_kaggle.api_status = 404

    with pytest.raises(KaggleDownloadError, match="not found") as caught:
        download_kaggle_dataset(SLUG, 7, dest)

    assert f"{SLUG} version 7" in str(caught.value)
    _assert_nothing_left(dest)


@pytest.mark.parametrize("status", [401, 403])
def test_rejected_credentials_are_named(fake_kaggle, api_key_env, dest, status):
    fake_kaggle.api_status = status

    with pytest.raises(KaggleDownloadError, match="rejected the credentials") as caught:
        download_kaggle_dataset(SLUG, None, dest)

    assert "KAGGLE_USERNAME" in str(caught.value)  # says which credentials were used
    _assert_nothing_left(dest)


def test_truncated_zip_is_rejected(fake_kaggle, api_key_env, dest):
    fake_kaggle.archive = fake_kaggle.archive[: len(fake_kaggle.archive) // 2]

    with pytest.raises(KaggleDownloadError, match="not a valid zip"):
        download_kaggle_dataset(SLUG, None, dest)

    _assert_nothing_left(dest)


def test_connection_dropped_mid_file_is_rejected(fake_kaggle, api_key_env, dest):
    # The server promises the whole archive but closes after half of it.
    fake_kaggle.declared_length = len(fake_kaggle.archive)
    fake_kaggle.archive = fake_kaggle.archive[: len(fake_kaggle.archive) // 2]

    with pytest.raises(KaggleDownloadError, match=f"connection broke before the whole archive of {SLUG}"):
        download_kaggle_dataset(SLUG, None, dest)

    _assert_nothing_left(dest)


def test_crc_mismatch_is_rejected(fake_kaggle, api_key_env, dest):
    # Stored (uncompressed) so one flipped byte of file data survives as a CRC error for testzip.
    archive = bytearray(build_zip(SAMPLE_FILES, zipfile.ZIP_STORED))
    first = next(iter(SAMPLE_FILES.values()))
    offset = bytes(archive).index(first) + len(first) // 2
    archive[offset] ^= 0xFF
    fake_kaggle.archive = bytes(archive)

    with pytest.raises(KaggleDownloadError, match="CRC check failed"):
        download_kaggle_dataset(SLUG, None, dest)

    _assert_nothing_left(dest)


def test_unreachable_api_says_so(api_key_env, dest):
    if not _port_is_free(FAKE_PORT):
        pytest.fail(f"something listens on port {FAKE_PORT}; this test needs it closed (connection refused)")

    with pytest.raises(KaggleDownloadError, match="Could not reach the Kaggle API at http://localhost:7777"):
        download_kaggle_dataset(SLUG, None, dest)

    _assert_nothing_left(dest)


def test_stalled_server_times_out(fake_kaggle, api_key_env, dest, monkeypatch):
    monkeypatch.setattr(kaggle_source, "HTTP_TIMEOUT_S", (2.0, 0.5))
    fake_kaggle.stall = threading.Event()

    expected = f"The Kaggle API at http://localhost:{FAKE_PORT} stopped answering while downloading {SLUG}"
    with pytest.raises(KaggleDownloadError, match=expected):
        download_kaggle_dataset(SLUG, None, dest)

    _assert_nothing_left(dest)


def test_zip_slip_entry_is_refused(fake_kaggle, api_key_env, dest, tmp_path):
    fake_kaggle.archive = build_zip({"Training/glioma/ok.jpg": b"x", "../evil.txt": b"owned"})

    with pytest.raises(KaggleDownloadError, match="unsafe entry '../evil.txt'"):
        download_kaggle_dataset(SLUG, None, dest)

    assert [p for p in tmp_path.rglob("evil.txt")] == []
    _assert_nothing_left(dest)


@pytest.mark.parametrize(
    "slug, version, message",
    [
        ("brain-tumor-mri-dataset", None, "owner/dataset"),
        (f"{SLUG}/versions/3", None, "owner/dataset"),
        (SLUG, 0, "integer >= 1"),
        (SLUG, True, "integer >= 1"),
    ],
)
def test_bad_arguments_fail_before_any_request(fake_kaggle, api_key_env, dest, slug, version, message):
    with pytest.raises(ValueError, match=message):
        download_kaggle_dataset(slug, version, dest)

    assert fake_kaggle.requests == []


def test_non_empty_or_missing_dest_is_refused(fake_kaggle, api_key_env, dest):
    (dest / "stale.txt").write_text("left over")
    with pytest.raises(ValueError, match="must be an empty directory"):
        download_kaggle_dataset(SLUG, None, dest)
    with pytest.raises(NotADirectoryError):
        download_kaggle_dataset(SLUG, None, dest / "missing")
    assert fake_kaggle.requests == []


# --------------------------------------------------------------------------- find_kaggle_credentials


@pytest.fixture
def home(tmp_path) -> Path:
    folder = tmp_path / "home"
    (folder / ".kaggle").mkdir(parents=True)
    return folder


def test_no_credentials_found(home):
    assert find_kaggle_credentials({}, home) is None


def test_kaggle_json_in_home(home):
    _write_kaggle_json(home)
    assert find_kaggle_credentials({}, home) == str(home / ".kaggle" / "kaggle.json")


def test_kaggle_json_in_config_dir(home, tmp_path):
    config_dir = tmp_path / "cfg"
    config_dir.mkdir()
    (config_dir / "kaggle.json").write_text(json.dumps({"username": "u", "key": "k"}))
    _write_kaggle_json(home)  # ignored: KAGGLE_CONFIG_DIR wins, as in the kaggle client

    environ = {"KAGGLE_CONFIG_DIR": str(config_dir)}
    assert find_kaggle_credentials(environ, home) == str(config_dir / "kaggle.json")


def test_kaggle_json_in_xdg_config_when_no_dot_kaggle(tmp_path):
    home = tmp_path / "home"
    xdg_file = home / ".config" / "kaggle" / "kaggle.json"
    xdg_file.parent.mkdir(parents=True)
    xdg_file.write_text(json.dumps({"username": "u", "key": "k"}))
    assert find_kaggle_credentials({}, home) == str(xdg_file)


def test_env_username_and_key(home):
    environ = {"KAGGLE_USERNAME": "u", "KAGGLE_KEY": "k"}
    assert find_kaggle_credentials(environ, home) == "environment variables KAGGLE_USERNAME and KAGGLE_KEY"


def test_env_username_alone_is_not_enough(home):
    assert find_kaggle_credentials({"KAGGLE_USERNAME": "u"}, home) is None


def test_env_key_completes_kaggle_json(home):
    (home / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "u"}))
    found = find_kaggle_credentials({"KAGGLE_KEY": "k"}, home)
    assert found == f"{home / '.kaggle' / 'kaggle.json'} with KAGGLE_KEY from the environment"


def test_api_token_env_value_and_file(home, tmp_path):
    assert find_kaggle_credentials({"KAGGLE_API_TOKEN": "abc"}, home) == "environment variable KAGGLE_API_TOKEN"
    token_file = tmp_path / "token.txt"
    token_file.write_text("abc\n")
    found = find_kaggle_credentials({"KAGGLE_API_TOKEN": str(token_file)}, home)
    assert found == f"token file {token_file} (KAGGLE_API_TOKEN)"


def test_access_token_file_in_home(home):
    (home / ".kaggle" / "access_token").write_text("abc")
    assert find_kaggle_credentials({}, home) == f"token file {home / '.kaggle' / 'access_token'}"


def test_blank_access_token_file_is_ignored(home):
    (home / ".kaggle" / "access_token").write_text("  \n")
    assert find_kaggle_credentials({}, home) is None


def test_oauth_credentials(home):
    _write_oauth_credentials(home)
    assert find_kaggle_credentials({}, home).startswith(f"OAuth credentials {home / '.kaggle' / 'credentials.json'}")


def test_token_wins_over_api_key(home):
    _write_kaggle_json(home)
    environ = {"KAGGLE_API_TOKEN": "abc", "KAGGLE_USERNAME": "u", "KAGGLE_KEY": "k"}
    assert find_kaggle_credentials(environ, home) == "environment variable KAGGLE_API_TOKEN"


def test_malformed_kaggle_json_is_an_error(home):
    (home / ".kaggle" / "kaggle.json").write_text("{username: oops")
    with pytest.raises(KaggleCredentialsError, match="not valid JSON"):
        find_kaggle_credentials({}, home)


def test_importing_module_does_not_load_the_kaggle_client():
    # `import kaggle` authenticates at import time; the module must only load the client on download.
    import subprocess
    import sys

    code = "import sys, braintumor.data.kaggle; print('kaggle' in sys.modules, 'kagglesdk' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
