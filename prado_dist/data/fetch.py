"""Download the five painters' images from the Prado's servers into the Kaggle layout.

`python -m prado_dist.data fetch --csv prado.csv --out DIR` reads the Kaggle metadata file, keeps
the rows whose `author` is one of the five painters (report-facts.md: exact author strings),
downloads each `work_image_url` into `DIR/images/<last path part of the URL>` and copies the csv
to `DIR/prado.csv`, so that `DIR` can be passed as the dataset root directly.

The report's notebook also downloaded with a thread pool, and its saved run silently lost 4 of
2,364 images. This version makes the losses visible and recoverable: bounded concurrency,
retries with exponential backoff and jitter on transient errors, a check of the received bytes
against Content-Length, atomic writes (so a file that exists is complete, which is what makes
resuming a matter of skipping existing files) and a final summary listing every failure with
its reason.
"""

from __future__ import annotations

import argparse
import csv
import errno
import http.client
import os
import random
import shutil
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from prado_dist.data.sources import PRADO_CSV, image_name_from_url, read_painter_rows

_CHUNK_BYTES = 1 << 16
_USER_AGENT = "prado_dist-fetch/0.1 (research; Python urllib)"
# 404/410 say the resource is gone: retrying only wastes the server's time and ours. Any other 4xx
# is a problem with the request itself and just as permanent, except these two, which servers
# use for "not now".
_TRANSIENT_CLIENT_ERRORS = frozenset({408, 429})
# Only web URLs are fetched: a csv row with file:// (or ftp://, data:) would copy local files or
# reach other services into the dataset (issue 21, item 12). Redirects are held to the same rule.
ALLOWED_SCHEMES = ("http", "https")
# Errors of this machine's disk, not of the server: every other image would fail alike, so the run
# stops at the first one instead of retrying each image (issue 21, item 9).
_LOCAL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


@dataclass
class FetchSummary:
    """What one `fetch_images` run did. `failed` holds `(url, reason)` pairs."""

    downloaded: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def format(self) -> str:
        lines = [f"downloaded {self.downloaded}, skipped {self.skipped} (already complete), failed {len(self.failed)}"]
        lines += [f"  FAILED {url}: {reason}" for url, reason in self.failed]
        return "\n".join(lines)


class _PermanentError(Exception):
    """A failure that another attempt cannot fix (404, 410, other 4xx)."""


class _TransientError(Exception):
    """A failure worth retrying (5xx, truncated body, ...)."""


class _Interrupted(Exception):
    """The run is being cancelled; stop without retrying."""


class FetchAborted(Exception):
    """The run cannot go on (the output disk is full or read-only); the message says what to do."""


class _WebOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirect handling, refusing a redirect to anything but http(s) (urllib allows ftp)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ALLOWED_SCHEMES:
            raise _PermanentError(f"redirected to {newurl!r}; only {'/'.join(ALLOWED_SCHEMES)} URLs are fetched")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_WebOnlyRedirects)


def url_problem(url: str) -> str | None:
    """Why `url` is not fetched (a scheme other than http/https), or None when it may be."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        return f"only {'/'.join(ALLOWED_SCHEMES)} URLs are fetched, not {scheme or 'a URL without scheme'}"
    return None


def image_file_name(url: str) -> str:
    """The Kaggle file name of an image: the last path part of its URL, percent-decoded.

    The same name `sources.find_samples` looks each csv row up by, so fetched files are found.
    """
    name = image_name_from_url(url)
    # The name becomes a path on disk: refuse anything that could escape the images folder.
    if name in ("", ".", "..") or "/" in name or "\\" in name or name.endswith(".part"):
        raise ValueError(f"cannot derive an image file name from URL {url!r}")
    return name


def _content_length(response: http.client.HTTPResponse) -> int | None:
    try:
        return int(response.headers["Content-Length"])
    except (TypeError, ValueError):
        return None  # absent or malformed: nothing to check against


def _download_once(url: str, destination: Path, timeout: float, stop: threading.Event) -> None:
    """One attempt: stream `url` into `destination.part`, check it, fsync, rename into place."""
    part = destination.with_name(destination.name + ".part")
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        # `timeout` bounds the connect and every single read, so a server that stalls mid-body
        # fails after `timeout` seconds instead of hanging the worker for ever.
        with _OPENER.open(request, timeout=timeout) as response, open(part, "wb") as out:
            expected = _content_length(response)
            received = 0
            while chunk := response.read(_CHUNK_BYTES):
                if stop.is_set():
                    raise _Interrupted()
                out.write(chunk)
                received += len(chunk)
            # http.client returns a short body without complaint when the server closes early
            # (see HTTPResponse.readinto), so the truncation check is ours to make.
            if expected is not None and received != expected:
                raise _TransientError(f"truncated body: {received} of {expected} bytes")
            if received == 0:
                raise _TransientError("empty body")
            out.flush()
            os.fsync(out.fileno())
        os.replace(part, destination)
    except urllib.error.HTTPError as error:
        if error.code >= 500 or error.code in _TRANSIENT_CLIENT_ERRORS:
            raise _TransientError(f"HTTP {error.code} {error.reason}") from error
        raise _PermanentError(f"HTTP {error.code} {error.reason}") from error
    except urllib.error.URLError as error:
        raise _TransientError(f"connection error: {error.reason}") from error
    except TimeoutError as error:
        raise _TransientError(f"timed out after {timeout:g} s") from error
    except (http.client.HTTPException, ConnectionError) as error:
        raise _TransientError(f"{type(error).__name__}: {error}") from error
    finally:
        part.unlink(missing_ok=True)


def _download_with_retries(
    url: str, destination: Path, *, retries: int, timeout: float, backoff: float, stop: threading.Event
) -> str | None:
    """Download with up to `retries` extra attempts; `None` on success, else the last reason."""
    reason = "not attempted"
    for attempt in range(retries + 1):
        if stop.is_set():
            return "interrupted"
        try:
            _download_once(url, destination, timeout, stop)
            return None
        except _Interrupted:
            return "interrupted"
        except _PermanentError as error:
            return str(error)
        except OSError as error:
            if error.errno in _LOCAL_DISK_ERRNOS:
                stop.set()  # the other downloads would fail alike: end them too
                raise FetchAborted(
                    f"cannot write {error.filename or destination}: {error.strerror or error}; free space or fix "
                    "the permissions of --out, then rerun the same command (complete files are skipped)"
                ) from error
            reason = str(error) or type(error).__name__
        except _TransientError as error:
            reason = str(error) or type(error).__name__
        if attempt < retries:
            # Exponential backoff; the jitter de-synchronises the workers that all hit the same
            # overloaded server at once, so they do not come back in lock step.
            delay = backoff * 2**attempt * (0.5 + random.random())
            if stop.wait(delay):
                return "interrupted"
    return f"{reason} (after {retries + 1} attempts)"


def _atomic_copy(source: Path, destination: Path) -> None:
    if destination.exists() and source.resolve() == destination.resolve():
        return
    part = destination.with_name(destination.name + ".part")
    with open(source, "rb") as src, open(part, "wb") as out:
        shutil.copyfileobj(src, out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(part, destination)


def fetch_images(
    csv_path: Path,
    out_dir: Path,
    *,
    concurrency: int = 8,
    retries: int = 4,
    timeout: float = 30.0,
    backoff: float = 0.5,
) -> FetchSummary:
    """Download the five painters' images listed in `csv_path` into `out_dir/images/`.

    Files that already exist are complete (they only appear through an atomic rename) and are
    skipped, so an interrupted run resumes by running it again; stale `.part` files are removed.
    Ctrl-C cancels the queued downloads and re-raises.
    """
    _check_fetch_settings(concurrency, retries, timeout, backoff)
    csv_path, out_dir = Path(csv_path), Path(out_dir)
    if not csv_path.is_file():
        raise FileNotFoundError(f"metadata csv not found: {csv_path} (the Kaggle file is prado.csv)")

    # Both forms of an author string, as sources.py reads them: else the dataset would list rows whose
    # files were never fetched.
    rows = [row for _, _, row in read_painter_rows(csv_path)]
    images_dir = _prepare_dataset_folder(csv_path, out_dir)
    summary = FetchSummary()
    todo = plan_downloads(rows, images_dir, summary)
    _download_all(todo, summary, concurrency=concurrency, retries=retries, timeout=timeout, backoff=backoff)
    return summary


def _check_fetch_settings(concurrency: int, retries: int, timeout: float, backoff: float) -> None:
    """`ValueError` naming the command-line option whose value cannot work."""
    if concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {concurrency}")
    if retries < 0:
        raise ValueError(f"--retries must be 0 or more, got {retries}")
    if timeout <= 0 or backoff < 0:
        raise ValueError(f"--timeout must be > 0 and --backoff >= 0, got {timeout} and {backoff}")


def _prepare_dataset_folder(csv_path: Path, out_dir: Path) -> Path:
    """`out_dir/images/`, created, with the csv copied beside it and a killed run's leftovers removed."""
    images_dir = out_dir / "images"
    try:
        images_dir.mkdir(parents=True, exist_ok=True)
        _atomic_copy(csv_path, out_dir / PRADO_CSV)
    except OSError as err:
        raise FetchAborted(f"cannot write the dataset folder --out {out_dir}: {err.strerror or err}") from err
    # Leftovers of a killed run: never complete (the rename did not happen), so they go.
    for stale in images_dir.glob("*.part"):
        stale.unlink(missing_ok=True)
    return images_dir


def plan_downloads(rows: list[dict[str, str]], images_dir: Path, summary: FetchSummary) -> dict[str, Path]:
    """url -> destination of every image still to download; counts present files in `summary` and
    records there the rows that cannot be downloaded (no URL, a bad or clashing file name)."""
    todo: dict[str, Path] = {}
    names: dict[str, str] = {}
    seen_urls: set[str] = set()
    for row in rows:
        url = (row.get("work_image_url") or "").strip()
        if not url:
            summary.failed.append((row.get("work_url") or row.get("work_title") or "?", "row has no work_image_url"))
            continue
        problem = url_problem(url)
        if problem:
            summary.failed.append((url, problem))
            continue
        try:
            name = image_file_name(url)
        except ValueError as error:
            summary.failed.append((url, str(error)))
            continue
        first_url = names.setdefault(name, url)
        if first_url != url:
            summary.failed.append((url, f"file name {name} is already taken by {first_url}"))
            continue
        if url in seen_urls:
            continue  # the same image listed twice
        seen_urls.add(url)
        destination = images_dir / name
        if destination.exists():
            summary.skipped += 1
        else:
            todo[url] = destination
    return todo


def _download_all(
    todo: dict[str, Path], summary: FetchSummary, *, concurrency: int, retries: int, timeout: float, backoff: float
) -> None:
    """Download `todo` on `concurrency` threads with a progress bar; results go into `summary`."""
    stop = threading.Event()
    executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="fetch")
    try:
        futures = {
            executor.submit(
                _download_with_retries, url, destination, retries=retries, timeout=timeout, backoff=backoff, stop=stop
            ): url
            for url, destination in todo.items()
        }
        with tqdm(total=len(futures), unit="img", desc="fetch", disable=None) as progress:
            for future in as_completed(futures):
                url = futures[future]
                try:
                    error = future.result()
                except FetchAborted:
                    raise
                except Exception as unexpected:  # a bug or a full disk: report it, go on
                    error = f"{type(unexpected).__name__}: {unexpected}"
                if error is None:
                    summary.downloaded += 1
                else:
                    summary.failed.append((url, error))
                    progress.write(f"failed {url}: {error}")
                progress.update()
    except BaseException:
        # Ctrl-C: without this the executor would wait for every queued download first.
        stop.set()
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    executor.shutdown(wait=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `fetch` sub-command's flags."""
    parser.add_argument("--csv", type=Path, required=True, help="the Kaggle metadata file prado.csv")
    parser.add_argument("--out", type=Path, required=True, help="dataset root to create: DIR/prado.csv and DIR/images/")
    parser.add_argument("--concurrency", type=int, default=8, help="parallel downloads (default 8)")
    parser.add_argument("--retries", type=int, default=4, help="extra attempts on transient errors (default 4)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds for the connection and for each read (default 30)",
    )
    parser.add_argument(
        "--backoff",
        type=float,
        default=0.5,
        help="first retry delay in seconds, doubled per attempt (default 0.5)",
    )


def main(args: argparse.Namespace) -> int:
    """Run `fetch`; exit code 1 when any image could not be downloaded, 2 when the run could not start
    or had to stop (bad flags, a csv that is missing or not prado.csv, a full or read-only disk)."""
    try:
        summary = fetch_images(
            args.csv,
            args.out,
            concurrency=args.concurrency,
            retries=args.retries,
            timeout=args.timeout,
            backoff=args.backoff,
        )
    except (ValueError, FetchAborted, OSError, csv.Error) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary.format())
    if summary.failed:
        print("Re-run the same command to retry the failed images; complete files are skipped.", file=sys.stderr)
        return 1
    print(f"dataset root ready: {args.out}")
    return 0


if __name__ == "__main__":
    # Also runnable on its own (`python -m prado_dist.data.fetch`), which the tests use.
    _parser = argparse.ArgumentParser(prog="python -m prado_dist.data.fetch", description=__doc__)
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
