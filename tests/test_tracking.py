"""MLflow tracking against MLflow's real local (SQLite) store, and against a dead server."""

from __future__ import annotations

import http.server
import logging
import threading
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from experiments.tracking import PARENT_TAG, Tracker, read_runs, tracking_uri


@pytest.fixture(autouse=True)
def _no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    # The embedded store is the subject here; a developer's own server must not receive test runs.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One store for the module: creating MLflow's SQLite schema takes seconds.
    return tmp_path_factory.mktemp("mlflow")


def test_params_metrics_and_artifacts_are_read_back(store: Path, tmp_path: Path) -> None:
    # prepare
    report = tmp_path / "report.json"
    report.write_text('{"psnr": 20.0}')
    params = {"data.image_size": 32, "model.channels": [32, 64], "train.lr": 1e-4, "long": "x" * 7000}

    # execute
    with Tracker(store, "train", "slice-stage") as tracker:
        tracker.log_params(params)
        for step in range(3):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "note": "skipped"}, step=step)
        tracker.log_artifact(report, "reports")
        run_id = tracker.run_id

    # assert
    mlflow.set_tracking_uri(tracking_uri(store))
    frame = mlflow.search_runs(experiment_names=["train"])
    row = frame[frame["run_id"] == run_id].iloc[0]
    assert row["status"] == "FINISHED"
    assert row["params.data.image_size"] == "32"
    assert row["params.model.channels"] == "[32, 64]"
    assert len(row["params.long"]) == 6000
    assert row["metrics.loss"] == pytest.approx(1.0 / 3)
    assert "metrics.note" not in frame.columns
    client = MlflowClient(tracking_uri=tracking_uri(store))
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert history == [(0, 1.0), (1, 0.5), (2, pytest.approx(1.0 / 3))]
    assert [a.path for a in client.list_artifacts(run_id, "reports")] == ["reports/report.json"]
    assert (store / "mlartifacts").is_dir()


def test_nested_site_runs_point_at_their_parent(store: Path) -> None:
    # prepare
    sites = ["site-0", "site-1"]

    # execute
    with Tracker(store, "federated", "server") as server:
        for round_ in range(2):
            for site in sites:
                with server.nested(site) as child:
                    child.log_metrics({"loss": 0.1 * round_, "epsilon": 0.5 * round_}, step=round_)
            server.log_metrics({"round_time_s": 1.0}, step=round_)
        parent_id = server.run_id

    # assert
    runs = read_runs(store, "federated")
    children = [run for run in runs if run["parent_run_id"] == parent_id]
    assert len(children) == 4
    assert {run["run_name"] for run in children} == set(sites)
    assert all(run["tags"][PARENT_TAG] == parent_id for run in children)
    parent = next(run for run in runs if run["run_id"] == parent_id)
    assert parent["parent_run_id"] is None
    assert parent["metrics"]["round_time_s"] == 1.0


def test_failed_block_marks_the_run_failed(store: Path) -> None:
    # prepare
    run_ids = []

    # execute
    with pytest.raises(KeyError), Tracker(store, "failures", "crash") as tracker:
        run_ids.append(tracker.run_id)
        raise KeyError("boom")

    # assert
    runs = read_runs(store, "failures")
    assert [run["status"] for run in runs if run["run_id"] == run_ids[0]] == ["FAILED"]


def test_final_model_is_registered_with_an_alias(store: Path, tmp_path: Path) -> None:
    # prepare
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    (run_folder / "slice.safetensors").write_bytes(b"weights")
    (run_folder / "config.json").write_text("{}")

    # execute
    with Tracker(store, "federated", "server") as tracker:
        version = tracker.register_model(run_folder, "gem3d-global", "final")

    # assert
    client = MlflowClient(tracking_uri=tracking_uri(store), registry_uri=tracking_uri(store))
    by_alias = client.get_model_version_by_alias("gem3d-global", "final")
    assert str(by_alias.version) == version
    local = Path(mlflow.artifacts.download_artifacts(by_alias.source, tracking_uri=tracking_uri(store)))
    assert (local / "slice.safetensors").read_bytes() == b"weights"


def test_a_failing_call_warns_once_and_turns_into_no_ops(store: Path, tmp_path: Path, caplog) -> None:
    # prepare
    missing = tmp_path / "does-not-exist.png"

    # execute
    with caplog.at_level(logging.WARNING, logger="experiments.tracking"), Tracker(store, "train", "r") as tracker:
        tracker.log_artifact(missing)
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.log_artifact(missing)
        child = tracker.nested("after-failure")
        run_id = tracker.run_id

    # assert
    assert not tracker.enabled
    assert not child.enabled and child.run_id is None
    assert len(caplog.records) == 1
    runs = read_runs(store, "train")
    assert "after-failure" not in {run["run_name"] for run in runs}
    run = next(run for run in runs if run["run_id"] == run_id)
    assert run["metrics"] == {}
    assert run["status"] == "RUNNING"  # disabled trackers stop talking to the store altogether


def test_unreachable_server_warns_once_and_never_raises(tmp_path: Path, monkeypatch, caplog) -> None:
    # prepare: port 9 (discard) on loopback has nothing listening
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")

    # execute
    with caplog.at_level(logging.WARNING, logger="experiments.tracking"), Tracker(tmp_path, "e", "server") as server:
        server.log_params({"a": 1})
        server.log_metrics({"loss": 1.0}, step=0)
        with server.nested("site-0") as site:
            site.log_metrics({"loss": 1.0}, step=0)
        version = server.register_model(tmp_path, "m", "final")

    # assert
    assert version is None
    assert not server.enabled and not site.enabled
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert "127.0.0.1:9" in caplog.records[0].getMessage()
    assert not (tmp_path / "mlflow.db").exists()


class _NotMlflow(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_error(404)

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


def test_a_server_that_is_not_mlflow_warns_once(tmp_path: Path, monkeypatch, caplog) -> None:
    # prepare: a loopback HTTP server that answers 404 to everything
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotMlflow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # set here so it is restored afterwards
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")

    # execute
    try:
        with caplog.at_level(logging.WARNING, logger="experiments.tracking"), Tracker(tmp_path, "e", "r") as tracker:
            tracker.log_metrics({"loss": 1.0}, step=0)
    finally:
        server.shutdown()
        server.server_close()

    # assert
    assert not tracker.enabled
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "start run failed" in warnings[0]


def test_a_resumed_server_reopens_its_runs(store: Path) -> None:
    # prepare: a first process logs round 0 and stops
    with Tracker(store, "resume", "server") as server, server.nested("site-0") as site:
        site.log_metrics({"loss": 1.0}, step=0)
    server_id, site_id = server.run_id, site.run_id

    # execute: the restarted server reopens both runs and logs round 1
    with Tracker(store, "resume", "server", run_id=server_id) as again, again.nested("site-0", run_id=site_id) as site:
        site.log_metrics({"loss": 0.5}, step=1)

    # assert
    runs = read_runs(store, "resume")
    assert len(runs) == 2
    client = MlflowClient(tracking_uri=tracking_uri(store))
    assert sorted((m.step, m.value) for m in client.get_metric_history(site_id, "loss")) == [(0, 1.0), (1, 0.5)]
    assert next(run for run in runs if run["run_id"] == site_id)["parent_run_id"] == server_id
