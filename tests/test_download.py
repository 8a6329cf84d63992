"""The downloader against a real HTTP server on 127.0.0.1 whose behaviour each test scripts per request."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

import pytest

from pipeline.config import DownloadSettings
from pipeline.contract import (
    DataError,
)
from pipeline.data import (
    MANIFEST_NAME,
    OFFICIAL_FILES,
    FileFact,
    load_official,
    md5_of,
    read_manifest,
)
from pipeline.stages import download
from pipeline.stages.download import download_files
from tests.official_files import checksums, write_official_folder
from tests.support import PROJECT_ROOT, free_port

FAST = DownloadSettings(timeout_s=10.0, retries=2, backoff_s=0.01)
MOUNT = "/mirror/kmnist/"  # files are served below a sub-path, like a real mirror


class FileServer:
    """Serves ``files`` by name; ``plans[name]`` is a queue of behaviours for the next requests."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.plans: dict[str, list[str]] = {}
        self.requests: list[str] = []
        self.partial_sent = threading.Event()
        self.release = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{MOUNT}"

    def count(self, name: str) -> int:
        return self.requests.count(name)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                name = self.path.removeprefix(MOUNT)
                server.requests.append(name)
                if name not in server.files:
                    self.send_error(404)
                    return
                plan = server.plans.get(name) or []
                action = plan.pop(0) if plan else "ok"
                body = server.files[name]
                if action in ("500", "404"):
                    self.send_error(int(action))
                    return
                self.send_response(200)
                if action != "no_length_truncate":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if action == "ok":
                    self.wfile.write(body)
                    return
                self.wfile.write(body[: len(body) // 2])  # every other action sends half the body
                self.wfile.flush()
                if action == "trickle":  # then stall until the test has killed the client
                    server.partial_sent.set()
                    server.release.wait(timeout=60)
                self.close_connection = True

        return Handler

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def official(tmp_path: Path) -> dict[str, Path]:
    return write_official_folder(tmp_path / "source", prefix="kmnist")


@pytest.fixture
def server(official: dict[str, Path]) -> Iterator[FileServer]:
    with FileServer({path.name: path.read_bytes() for path in official.values()}) as running:
        yield running


def _leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def test_download_success_verifies_and_writes_every_file(tmp_path, official, server):
    dest = tmp_path / "raw"
    paths = download_files(server.url, dest, checksums(official), FAST)
    assert [path.name for path in paths] == [path.name for path in official.values()]
    for source in official.values():
        assert (dest / source.name).read_bytes() == source.read_bytes()
    assert _leftovers(dest) == sorted(path.name for path in official.values())  # no temp files
    assert len(load_official(dest, "kmnist").classmap) == 10


def test_checksum_mismatch_is_a_clear_error_and_keeps_nothing(tmp_path, official, server):
    dest = tmp_path / "raw"
    expected = checksums(official)
    bad = official["train_labels"].name
    expected[bad] = "0" * 32
    with pytest.raises(DataError) as caught:
        download_files(server.url, dest, expected, FAST)
    message = str(caught.value)
    assert bad in message and f"{server.url}{bad}" in message and "MD5" in message
    assert "data.base_url" in message and "data.dataset=local" in message
    assert not (dest / bad).exists()
    assert not [name for name in _leftovers(dest) if name.endswith(".part")]
    assert server.count(bad) == 1  # a wrong file is not fetched again and again


def test_http_500_is_retried_then_succeeds(tmp_path, official, server):
    name = official["test_images"].name
    server.plans[name] = ["500"]
    download_files(server.url, tmp_path / "raw", checksums(official), FAST)
    assert server.count(name) == 2
    assert (tmp_path / "raw" / name).read_bytes() == official["test_images"].read_bytes()


def test_http_404_fails_at_once_naming_the_url(tmp_path, official, server):
    with pytest.raises(DataError, match=r"HTTP 404") as caught:
        download_files(server.url, tmp_path / "raw", {"missing.npz": "0" * 32}, FAST)
    assert f"{server.url}missing.npz" in str(caught.value)
    assert server.count("missing.npz") == 1


def test_truncated_body_is_detected_retried_and_reported(tmp_path, official, server):
    name = official["train_images"].name
    expected = {name: checksums(official)[name]}
    server.plans[name] = ["truncate"]  # once: the retry recovers
    download_files(server.url, tmp_path / "ok", expected, FAST)
    assert (tmp_path / "ok" / name).read_bytes() == official["train_images"].read_bytes()

    server.plans[name] = ["truncate"] * (FAST.retries + 1)  # every attempt: a clear error
    dest = tmp_path / "raw"
    with pytest.raises(DataError, match=r"truncated body") as caught:
        download_files(server.url, dest, expected, FAST)
    assert f"after {FAST.retries + 1} attempt(s)" in str(caught.value)
    assert _leftovers(dest) == []


def test_truncation_without_content_length_is_caught_by_the_known_size(tmp_path, official, server):
    name = official["train_images"].name
    server.plans[name] = ["no_length_truncate"] * (FAST.retries + 1)
    size = official["train_images"].stat().st_size
    with pytest.raises(DataError, match=rf"truncated body: {size // 2} of the expected {size} bytes"):
        download_files(
            server.url, tmp_path / "raw", {name: checksums(official)[name]}, FAST, sizes={name: size}
        )
    assert _leftovers(tmp_path / "raw") == []


def test_transfer_killed_midway_leaves_nothing_a_rerun_accepts(tmp_path, official, server):
    name = official["train_images"].name
    expected = {name: checksums(official)[name]}
    dest = tmp_path / "raw"
    server.plans[name] = ["trickle"]
    script = (
        "import sys; from pathlib import Path; from pipeline.config import DownloadSettings; "
        "from pipeline.stages.download import download_files; "
        f"download_files({server.url!r}, Path({str(dest)!r}), {expected!r}, "
        "DownloadSettings(timeout_s=60, retries=0, backoff_s=0))"
    )
    client = subprocess.Popen([sys.executable, "-c", script], cwd=PROJECT_ROOT, env={**os.environ})
    try:
        assert server.partial_sent.wait(timeout=60), "the client never started the download"
        deadline = time.monotonic() + 30
        while not any(path.stat().st_size for path in dest.glob("*.part")) and time.monotonic() < deadline:
            time.sleep(0.05)  # wait until half the body sits in the temporary file
        assert any(path.stat().st_size for path in dest.glob("*.part")), "no partial data was written"
    finally:
        os.kill(client.pid, signal.SIGKILL)
        client.wait(timeout=30)
        server.release.set()
    assert client.returncode == -signal.SIGKILL
    assert not (dest / name).exists()  # only a hidden temporary file, under a name nothing reads
    assert all(entry.startswith(".") and entry.endswith(".part") for entry in _leftovers(dest))

    download_files(server.url, dest, expected, FAST)
    assert (dest / name).read_bytes() == official["train_images"].read_bytes()
    assert _leftovers(dest) == [name]  # the stale temporary file was cleaned up


def test_unreachable_host_is_a_clear_error(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/k49/"  # nothing listens there
    options = DownloadSettings(timeout_s=5.0, retries=1, backoff_s=0.0)
    with pytest.raises(DataError) as caught:
        download_files(url, tmp_path / "raw", {"k49_classmap.csv": "0" * 32}, options)
    message = str(caught.value)
    assert f"{url}k49_classmap.csv" in message and "after 2 attempt(s)" in message
    assert "ConnectError" in message
    assert "data.base_url" in message and "data.dataset=local" in message
    assert _leftovers(tmp_path / "raw") == []


def test_second_run_skips_files_with_the_right_checksum(tmp_path, official, server):
    dest = tmp_path / "raw"
    expected = checksums(official)
    download_files(server.url, dest, expected, FAST)
    assert len(server.requests) == len(expected)
    download_files(server.url, dest, expected, FAST)
    assert len(server.requests) == len(expected)  # nothing fetched again

    damaged = dest / official["test_labels"].name
    damaged.write_bytes(b"not the file")
    download_files(server.url, dest, expected, FAST)
    assert server.requests[len(expected) :] == [damaged.name]  # only the damaged file is replaced
    assert damaged.read_bytes() == official["test_labels"].read_bytes()


def test_fetch_raw_checks_the_official_sizes_and_md5s(make_settings, server):
    """A mirror serving other files than the official KMNIST ones is refused before any body is kept."""
    settings = make_settings(
        {"data.dataset": "kmnist", "data.base_url": server.url, "data.download.retries": 1}
    )
    with pytest.raises(DataError) as caught:
        download.run(settings)
    message = str(caught.value)
    assert "kmnist-train-imgs.npz" in message and server.url in message and "expected 18384171" in message
    raw = settings.path("raw")
    assert _leftovers(raw) == []
    assert not (raw / MANIFEST_NAME).exists()
    assert _leftovers(settings.path("downloads") / "kmnist") == []


@pytest.fixture
def served_as_kmnist(monkeypatch, official) -> None:
    """The official KMNIST sizes and MD5s replaced by those of the small files the test server holds."""
    facts = {path.name: FileFact(md5_of(path), path.stat().st_size) for path in official.values()}
    monkeypatch.setitem(OFFICIAL_FILES, "kmnist", facts)


def test_fetch_raw_reuses_the_download_cache_after_raw_is_deleted(
    make_settings, official, server, served_as_kmnist
):
    settings = make_settings({"data.dataset": "kmnist", "data.base_url": server.url})
    names = sorted(path.name for path in official.values())
    raw = download.run(settings)
    cache = settings.path("downloads") / "kmnist"
    assert sorted(server.requests) == names
    assert _leftovers(cache) == names and _leftovers(raw) == sorted([*names, MANIFEST_NAME])
    for source in official.values():
        assert (raw / source.name).read_bytes() == source.read_bytes()
        assert os.path.samefile(raw / source.name, cache / source.name)  # a hard link: no second copy
    manifest = read_manifest(settings)

    shutil.rmtree(raw)  # what `dvc repro` does to a stage's outs before running it again
    download.run(settings)
    assert len(server.requests) == len(names)  # nothing downloaded again
    assert read_manifest(settings) == manifest

    # The cache is keyed by the official MD5s, not the URL: another mirror (here: nothing listening) shares it.
    shutil.rmtree(raw)
    download.run(settings.with_overrides({"data.base_url": f"http://127.0.0.1:{free_port()}/other/"}))
    assert len(server.requests) == len(names)

    damaged = cache / official["train_labels"].name
    damaged.write_bytes(b"bit rot")  # in place: a hard-linked raw copy changes with it
    shutil.rmtree(raw)
    download.run(settings)
    assert server.requests[len(names) :] == [damaged.name]  # only the damaged file is fetched again
    assert damaged.read_bytes() == (raw / damaged.name).read_bytes() == official["train_labels"].read_bytes()
    assert read_manifest(settings) == manifest


def test_fetch_raw_copies_when_hard_links_are_impossible(
    make_settings, official, server, served_as_kmnist, monkeypatch
):
    def no_links(source: object, target: object) -> None:
        raise OSError(18, "Invalid cross-device link")  # what another filesystem answers

    monkeypatch.setattr(download.os, "link", no_links)
    settings = make_settings({"data.dataset": "kmnist", "data.base_url": server.url})
    raw = download.run(settings)
    cache = settings.path("downloads") / "kmnist"
    for source in official.values():
        assert (raw / source.name).read_bytes() == source.read_bytes()
        assert not os.path.samefile(raw / source.name, cache / source.name)
    assert _leftovers(raw) == sorted([*(path.name for path in official.values()), MANIFEST_NAME])
