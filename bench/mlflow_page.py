"""What a person sees when opening a search's MLflow experiment, checked in a headless browser (issue 25).

Builds a small store as a search leaves it (an experiment tagged by prado_dist, a parent run with a
dataset input and two nested trial runs) and, beside it, an untagged experiment; serves it with
`mlflow server`; renders each experiment's plain page and the page prado_dist prints
(`tracking.experiment_page`) in headless Chromium (Debian's `chromium`); records which view each
opened (the page title: MLflow's GenAI "Overview", or "Runs") and whether the runs are listed, and
keeps a screenshot of the printed page as bench/results/mlflow_experiment_page.png.

    python bench/mlflow_page.py             # appends to bench/results/mlflow_page.jsonl
"""

from __future__ import annotations

import html
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

from prado_dist.search.mlflow_experiment import connect, experiment_page

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import record  # noqa: E402  (a sibling bench module)

RESULTS = Path(__file__).resolve().parent / "results"
PARENT_RUN = "resnet29-20261203-120000"


def browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def build_store(uri: str) -> dict[str, str]:
    """A search's experiment (tagged as prado_dist tags it) and an untagged one; their ids."""
    client, tagged = connect(uri, "paintings")
    parent = client.create_run(tagged, run_name=PARENT_RUN).info.run_id
    client.log_metric(parent, "best_val_balanced_accuracy", 0.71)
    for index in range(2):
        child = client.create_run(tagged, run_name=f"trial-{index}", tags={"mlflow.parentRunId": parent})
        client.log_metric(child.info.run_id, "val_balanced_accuracy", 0.5 + index / 10)
        client.set_terminated(child.info.run_id)
    client.set_terminated(parent)
    plain = MlflowClient(uri)
    untagged = plain.create_experiment("untagged")
    plain.set_terminated(plain.create_run(untagged, run_name=PARENT_RUN).info.run_id)
    return {"tagged": tagged, "untagged": untagged}


def serve(store: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", f"sqlite:///{store}", "--default-artifact-root", str(store.parent / "art")]
    log = open(store.parent / "server.log", "w")  # noqa: SIM115  (the server's, closed with it)
    process = subprocess.Popen([*command, "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                output = (store.parent / "server.log").read_text()[-2000:]
                raise RuntimeError(f"mlflow server did not start: {output}") from None
            time.sleep(0.5)


def render(url: str, screenshot: Path | None = None) -> dict[str, object]:
    """The page after its scripts ran: its title (the view it opened) and whether the runs are listed."""
    command = [browser(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    command += ["--window-size=1400,900", "--virtual-time-budget=20000"]
    dom = subprocess.run([*command, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    if screenshot is not None:
        subprocess.run([*command, f"--screenshot={screenshot}", url], capture_output=True, timeout=180, check=True)
    title = re.search(r"<title>(.*?)</title>", dom, flags=re.S)
    text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style).*?</\1>", "", dom))))
    return {
        "url": url,
        "title": html.unescape(title[1]).strip() if title else "",
        "runs_listed": PARENT_RUN in text,
        "genai_overview": "Traces 0" in text or "Token Usage" in text,
    }


def check_pages(folder: Path, screenshot: Path | None = None) -> dict[str, dict[str, object]]:
    store = folder / "mlflow.db"
    ids = build_store(f"sqlite:///{store}")
    process, server = serve(store)
    try:
        return {
            "tagged, plain page": render(f"{server}/#/experiments/{ids['tagged']}"),
            "untagged, plain page": render(f"{server}/#/experiments/{ids['untagged']}"),
            "tagged, prado_dist's page": render(experiment_page(server, ids["tagged"]), screenshot),
        }
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> int:
    if browser() is None:
        print("no chromium here: `apt-get install chromium` (Debian), then run again")
        return 2
    import mlflow

    with tempfile.TemporaryDirectory(prefix="mlflow-page-") as folder:
        pages = check_pages(Path(folder), RESULTS / "mlflow_experiment_page.png")
    for name, page in pages.items():
        print(
            f"{name}: {page['title']!r}, runs listed: {page['runs_listed']}, GenAI overview: {page['genai_overview']}"
        )
    version = subprocess.run([browser(), "--version"], capture_output=True, text=True).stdout.strip()
    line = record({"mlflow": mlflow.__version__, "browser": version, "pages": pages})
    with (RESULTS / "mlflow_page.jsonl").open("a") as file:
        file.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
