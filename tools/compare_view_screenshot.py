"""MLflow's Compare view of two pipeline runs, seen in a real browser: starts `mlflow server` on a repository's
tracking store (loopback only), reads the two runs back over the server's REST API (the data behind the page:
the params that differ, the stage metrics), then opens the Compare page in headless Chromium and saves a
screenshot.

    python tools/compare_view_screenshot.py REPO [--runs RUN_ID RUN_ID] [--output docs/figures/mlflow-compare.png]

REPO is a repository the pipeline ran in (its MLflow store is REPO/.mlflow/mlflow.db); without --runs, the two
newest pipeline runs. Needs a Chromium (`apt-get install chromium`); a script, not a test: starting the server
and a browser takes a minute on 2 cores. tests/test_dvc_comparisons.py checks the same data through MLflow.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rest(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def pipeline_runs(url: str) -> list[dict]:
    """Every pipeline run of every experiment, newest first."""
    experiments = rest(url, "/api/2.0/mlflow/experiments/search", {"max_results": 1000}).get("experiments", [])
    found = rest(url, "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [e["experiment_id"] for e in experiments], "max_results": 1000,
        "filter": "tags.`llmpipe.kind` = 'pipeline'", "order_by": ["attributes.start_time DESC"]})
    return found.get("runs", [])


def as_dict(entries: list[dict] | None) -> dict:
    return {entry["key"]: entry["value"] for entry in entries or []}


def describe(runs: list[dict]) -> None:
    """The params that differ between the runs and every metric of each, as the page shows them."""
    params = [as_dict(run["data"].get("params")) for run in runs]
    changed = sorted(key for key in set().union(*params) if len({p.get(key) for p in params}) > 1)
    print("params that differ:", ", ".join(f"{key}: {' vs '.join(str(p.get(key)) for p in params)}"
                                           for key in changed) or "none")
    for run in runs:
        metrics = as_dict(run["data"].get("metrics"))
        print(f"{run['info']['run_name']} ({run['info']['run_id']}): "
              + ", ".join(f"{key} {value:.4g}" for key, value in sorted(metrics.items())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("repo", type=Path)
    parser.add_argument("--runs", nargs=2, metavar="RUN_ID")
    parser.add_argument("--output", type=Path, default=Path("docs/figures/mlflow-compare.png"))
    parser.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args()
    store = args.repo.resolve() / ".mlflow" / "mlflow.db"
    if not store.is_file():
        sys.exit(f"error: {store}: no MLflow store (run the pipeline in {args.repo} first)")
    if not args.browser:
        sys.exit("error: no chromium on PATH (apt-get install chromium), or give --browser")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    sys.exit(f"error: mlflow server did not answer at {url} within 120 s")
                time.sleep(0.5)
        runs = pipeline_runs(url)
        chosen = [next(r for r in runs if r["info"]["run_id"] == run_id) for run_id in args.runs] if args.runs \
            else runs[:2]
        if len(chosen) < 2:
            sys.exit(f"error: {store}: fewer than two pipeline runs to compare")
        describe(chosen)
        query = urllib.parse.urlencode({
            "runs": json.dumps([run["info"]["run_id"] for run in chosen]),
            "experiments": json.dumps(sorted({run["info"]["experiment_id"] for run in chosen}))})
        page = f"{url}/#/compare-runs?{query}"
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="llmpipe-chromium-") as profile:
            subprocess.run([args.browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                            "--window-size=1600,2200", "--virtual-time-budget=20000", "--hide-scrollbars",
                            f"--screenshot={args.output.resolve()}", page],
                           check=True, capture_output=True, timeout=300)
        print(f"wrote {args.output} ({page})")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
