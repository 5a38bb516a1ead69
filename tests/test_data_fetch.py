"""`prado_dist.data.fetch` against a real HTTP server on 127.0.0.1 serving generated JPEGs.

The server misbehaves on request, per path and per attempt (404, 410, 500, truncated bodies,
stalls), and counts the requests it gets, so retries and resumption are checked by what went over
the wire, not by mocks.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prado_dist.data import fetch
from prado_dist.data.fetch import FetchSummary, fetch_images
from prado_dist.data.sources import PRADO_AUTHORS, find_samples

FAST = {"backoff": 0.01, "timeout": 5.0}  # keep retries quick; nothing here needs long waits


def _jpeg(index: int, size: int = 96) -> bytes:
    # Noise compresses badly, so each file is tens of kB and "half a body" is a real half.
    pixels = np.random.default_rng(index).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


class ImageServer:
    """A ThreadingHTTPServer whose per-path behaviour is scripted by `plan`.

    `plan[path]` lists the action for the 1st, 2nd, ... request of that path ("ok", "404",
    "410", "500", "truncate", "slow"); later requests get "ok". With `hang_after=k`, every request
    after the first k stalls half way through its body until `release` is set.
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.plan: dict[str, list[str]] = {}
        self.counts: Counter[str] = Counter()
        self.hang_after: int | None = None
        self.hanging = 0
        self.slow_seconds = 1.0
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._total = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()

    def _next_action(self, path: str) -> str:
        with self._lock:
            attempt = self.counts[path]
            self.counts[path] += 1
            self._total += 1
            if self.hang_after is not None and self._total > self.hang_after:
                return "hang"
            steps = self.plan.get(path, [])
            return steps[attempt] if attempt < len(steps) else "ok"

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass  # keep pytest output clean

            def do_GET(self) -> None:
                action = server._next_action(self.path)
                body = server.files.get(self.path)
                try:
                    if body is None or action == "404":
                        self.send_error(404)
                    elif action in ("410", "500"):
                        self.send_error(int(action))
                    elif action in ("truncate", "hang"):
                        self._send_head(len(body))
                        self.wfile.write(body[: len(body) // 2])
                        self.wfile.flush()
                        if action == "hang":
                            with server._lock:
                                server.hanging += 1
                            server.release.wait(60)
                        self.close_connection = True  # closing early is the truncation
                    else:
                        if action == "slow":
                            time.sleep(server.slow_seconds)
                        self._send_head(len(body))
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout, kill): expected in these tests

            def _send_head(self, length: int) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(length))
                self.end_headers()

        return Handler


def _write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["work_url", "work_image_url", "author", "work_title"])
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only 127.0.0.1 is ever contacted: make sure no proxy setting reroutes it.
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def server() -> Iterator[ImageServer]:
    files = {f"/images/{index:08x}-demo.jpg": _jpeg(index) for index in range(12)}
    files["/images/other-author.jpg"] = _jpeg(99)
    with ImageServer(files) as running:
        yield running


def _painter_paths(server: ImageServer) -> list[str]:
    return sorted(path for path in server.files if path != "/images/other-author.jpg")


def _make_csv(tmp_path: Path, server: ImageServer, paths: list[str] | None = None) -> Path:
    authors = list(PRADO_AUTHORS.values())
    paths = _painter_paths(server) if paths is None else paths
    rows = [
        {
            "work_url": f"https://example.invalid/obra/{i}",
            "work_image_url": server.url(path),
            "author": authors[i % len(authors)],
            "work_title": f"work {i}",
        }
        for i, path in enumerate(paths)
    ]
    # Another artist's work: must not be downloaded.
    rows.append(
        {
            "work_url": "https://example.invalid/obra/x",
            "author": "Velázquez, Diego",
            "work_image_url": server.url("/images/other-author.jpg"),
            "work_title": "other",
        }
    )
    csv_path = tmp_path / "source.csv"
    _write_csv(csv_path, rows)
    return csv_path


def _assert_complete(out: Path, server: ImageServer, paths: list[str]) -> None:
    for path in paths:
        file = out / "images" / path.rsplit("/", 1)[1]
        assert file.read_bytes() == server.files[path], file
        with Image.open(file) as image:
            image.load()  # decodes fully: a truncated JPEG raises here


def test_all_succeed_then_resume_skips_everything(tmp_path: Path, server: ImageServer) -> None:
    csv_path, out = _make_csv(tmp_path, server), tmp_path / "data"
    summary = fetch_images(csv_path, out, concurrency=4, **FAST)
    paths = _painter_paths(server)
    assert summary == FetchSummary(downloaded=len(paths), skipped=0, failed=[])
    _assert_complete(out, server, paths)
    assert (out / "prado.csv").read_bytes() == csv_path.read_bytes()  # DIR is a dataset root
    assert server.counts["/images/other-author.jpg"] == 0
    assert all(server.counts[path] == 1 for path in paths)
    found = find_samples(out)  # DIR is directly usable as a dataset root
    assert (found.layout, len(found.samples), found.rejected) == ("kaggle", len(paths), [])

    again = fetch_images(csv_path, out, concurrency=4, **FAST)
    assert again == FetchSummary(downloaded=0, skipped=len(paths), failed=[])
    assert all(server.counts[path] == 1 for path in paths)  # nothing re-requested


def test_404_and_410_are_reported_and_not_retried(
    tmp_path: Path, server: ImageServer, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = _painter_paths(server)[:4]
    server.plan = {paths[0]: ["404"] * 9, paths[1]: ["410"] * 9}
    args = argparse.Namespace(
        csv=_make_csv(tmp_path, server, paths),
        out=tmp_path / "data",
        concurrency=2,
        retries=4,
        timeout=5.0,
        backoff=0.01,
    )
    assert fetch.main(args) == 1  # non-zero exit when anything failed
    assert server.counts[paths[0]] == 1 and server.counts[paths[1]] == 1
    printed = capsys.readouterr().out
    assert "downloaded 2, skipped 0 (already complete), failed 2" in printed
    assert f"{server.url(paths[0])}: HTTP 404" in printed
    assert f"{server.url(paths[1])}: HTTP 410" in printed
    assert not (tmp_path / "data" / "images" / paths[0].rsplit("/", 1)[1]).exists()


def test_truncated_bodies_are_retried_until_complete(tmp_path: Path, server: ImageServer) -> None:
    paths = _painter_paths(server)[:3]
    server.plan = {paths[0]: ["truncate", "truncate", "ok"], paths[1]: ["truncate"]}
    summary = fetch_images(_make_csv(tmp_path, server, paths), tmp_path / "data", retries=4, **FAST)
    assert summary == FetchSummary(downloaded=3, skipped=0, failed=[])
    assert server.counts[paths[0]] == 3 and server.counts[paths[1]] == 2
    _assert_complete(tmp_path / "data", server, paths)


def test_always_truncated_fails_without_leaving_files(tmp_path: Path, server: ImageServer) -> None:
    paths = _painter_paths(server)[:2]
    server.plan = {paths[0]: ["truncate"] * 9}
    out = tmp_path / "data"
    summary = fetch_images(_make_csv(tmp_path, server, paths), out, retries=2, **FAST)
    assert summary.downloaded == 1 and len(summary.failed) == 1
    url, reason = summary.failed[0]
    assert url == server.url(paths[0])
    assert "truncated body" in reason and "after 3 attempts" in reason
    assert server.counts[paths[0]] == 3
    assert not (out / "images" / paths[0].rsplit("/", 1)[1]).exists()
    assert not list((out / "images").glob("*.part"))


def test_slow_response_times_out_and_is_retried(tmp_path: Path, server: ImageServer) -> None:
    paths = _painter_paths(server)[:2]
    server.plan = {paths[0]: ["slow"]}
    server.slow_seconds = 1.0
    summary = fetch_images(_make_csv(tmp_path, server, paths), tmp_path / "data", retries=2, timeout=0.3, backoff=0.01)
    assert summary == FetchSummary(downloaded=2, skipped=0, failed=[])
    assert server.counts[paths[0]] == 2
    _assert_complete(tmp_path / "data", server, paths)


def test_server_error_is_retried_and_timeout_reason_reported(tmp_path: Path, server: ImageServer) -> None:
    paths = _painter_paths(server)[:3]
    server.plan = {paths[0]: ["500", "ok"], paths[1]: ["slow"] * 9}
    server.slow_seconds = 0.6
    summary = fetch_images(_make_csv(tmp_path, server, paths), tmp_path / "data", retries=1, timeout=0.2, backoff=0.01)
    assert summary.downloaded == 2
    assert server.counts[paths[0]] == 2
    assert summary.failed == [(server.url(paths[1]), "timed out after 0.2 s (after 2 attempts)")]


def test_killed_run_leaves_only_complete_files_and_resumes(tmp_path: Path, server: ImageServer) -> None:
    paths, out, landed = _painter_paths(server), tmp_path / "data", 5
    csv_path = _make_csv(tmp_path, server)
    server.hang_after = landed  # the next requests stall half way through their bodies
    script = (
        "import argparse, sys; from prado_dist.data import fetch; "
        "p = argparse.ArgumentParser(); fetch.add_arguments(p); "
        "sys.exit(fetch.main(p.parse_args()))"
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            script,
            "--csv",
            str(csv_path),
            "--out",
            str(out),
            "--concurrency",
            "2",
            "--retries",
            "0",
            "--timeout",
            "30",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "NO_PROXY": "*"},
    )
    try:
        deadline = time.monotonic() + 50
        images = out / "images"
        while time.monotonic() < deadline:
            finals = [p for p in images.glob("*.jpg")] if images.exists() else []
            if server.hanging == 2 and len(finals) == landed and list(images.glob("*.part")):
                break
            assert process.poll() is None, "fetch exited before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail(f"no stall seen: hanging={server.hanging}")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    finals = sorted(images.glob("*.jpg"))
    assert len(finals) == landed
    complete = [path for path in paths if (images / path.rsplit("/", 1)[1]).exists()]
    _assert_complete(out, server, complete)  # no half-written file under a final name

    server.hang_after = None
    server.release.set()
    summary = fetch_images(csv_path, out, concurrency=2, **FAST)
    assert summary == FetchSummary(downloaded=len(paths) - landed, skipped=landed, failed=[])
    _assert_complete(out, server, paths)
    assert all(server.counts[path] == 1 for path in complete)  # not fetched again
    assert not list(images.glob("*.part"))  # the killed run's leftovers are gone


def test_decomposed_author_string_is_still_a_painter(tmp_path: Path, server: ImageServer) -> None:
    # "Subías" written as "i" + combining acute: the same painter for sources.py, so fetched too.
    path = _painter_paths(server)[0]
    rows = [
        {
            "work_url": "w",
            "work_image_url": server.url(path),
            "author": "Bayeu y Subi\u0301as, Francisco",
            "work_title": "t",
        }
    ]
    _write_csv(tmp_path / "nfd.csv", rows)
    summary = fetch_images(tmp_path / "nfd.csv", tmp_path / "data", **FAST)
    assert summary == FetchSummary(downloaded=1, skipped=0, failed=[])
