"""MLflow tracking: the only module that imports mlflow, and it imports nothing of ours.

The embedded default is a SQLite store in a folder the caller names (the run or project folder):
``sqlite:///<store_dir>/mlflow.db`` with artifacts under ``<store_dir>/mlartifacts``. MLflow 3.17
refuses the old ``file:`` store unless ``MLFLOW_ALLOW_FILE_STORE`` is set, so SQLite is the local
store that works without opt-outs. ``MLFLOW_TRACKING_URI`` in the environment sends everything to
that server instead; the server then decides where artifacts go. For a server, unless they are
set already, ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=3`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT=30`` replace
MLflow's minutes-long retry defaults.

Tracking never breaks training (issue 7): the first failing MLflow call, or a server that cannot
be reached, logs one warning and turns the tracker, its parent and all its nested runs into
no-ops for the rest of the run (a new top-level ``Tracker`` tries again). Browse a local store with
``mlflow ui --backend-store-uri sqlite:///<store_dir>/mlflow.db``.

The API is explicit (an ``MlflowClient`` per tracker, run ids passed around), not MLflow's
fluent global "active run": the federated server logs one parent run and a nested run per site
at the same time, which the fluent API's single active-run stack cannot express.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

LOG = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
PARENT_TAG = "mlflow.parentRunId"  # the tag MLflow's UI uses to nest runs
_PARAM_BATCH = 100  # MLflow's log_batch limit on params per request
_METRIC_BATCH = 1000  # MLflow's log_batch limit on metrics per request
_PARAM_MAX_CHARS = 6000  # MLflow rejects longer param values, which would switch tracking off
_PROBE_TIMEOUT_S = 3.0
# MLflow's HTTP defaults (7 retries with exponential backoff, 120 s timeout) ride out a rate-limited
# server but would stall training for many minutes if the server dies mid-run. Ours, used unless
# the user set these variables: a dead server costs at most ~2 minutes, once, then tracking is off.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def tracking_uri(store_dir: str | Path) -> str:
    """The store every tracker in this process writes to.

    Args:
        store_dir: folder of the embedded store; used only when ``MLFLOW_TRACKING_URI`` is unset.

    Returns:
        ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<abs store_dir>/mlflow.db``.
    """
    env = os.environ.get(TRACKING_URI_ENV, "").strip()
    if env:
        return env
    return f"sqlite:///{(Path(store_dir).resolve() / 'mlflow.db').as_posix()}"


def ui_command(store_dir: str | Path) -> str:
    """The shell command that browses the store (for the CLI's closing message)."""
    uri = tracking_uri(store_dir)
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri}"
    return f"open {uri} in a browser"


def _probe(uri: str) -> str | None:
    """Return why an HTTP tracking server cannot be reached, or None if it answered at all.

    MLflow's own client retries a dead server with exponential backoff for minutes; one plain
    request with a short timeout decides up front. Any HTTP answer (even 401/404) means the
    server is there; only connection failures count.
    """
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=_PROBE_TIMEOUT_S):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as error:
        return str(getattr(error, "reason", error))


class _Shared:
    """State shared by a tracker and its nested runs: one client, one 'disabled' switch."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.client: MlflowClient | None = None
        self.enabled = True

    def disable(self, what: str, error: BaseException | str) -> None:
        if self.enabled:
            self.enabled = False
            LOG.warning(
                "MLflow tracking disabled for this run (%s failed on %s: %s); training goes on", what, self.uri, error
            )


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, list | tuple | dict):
        text = json.dumps(value)
    else:
        text = str(value)
    return text if len(text) <= _PARAM_MAX_CHARS else text[: _PARAM_MAX_CHARS - 1] + "…"


class Tracker:
    """One MLflow run. A context manager: the run ends FINISHED, or FAILED if the block raised.

    Args:
        store_dir: folder of the embedded store (ignored when ``MLFLOW_TRACKING_URI`` is set).
        experiment: MLflow experiment name; created on first use.
        run_name: display name of the run.
        tags: extra string tags.
        parent: make this a nested run under ``parent`` (prefer ``parent.nested(name)``).
        run_id: reopen this existing run instead of creating one (a resumed server).
    """

    def __init__(
        self,
        store_dir: str | Path,
        experiment: str,
        run_name: str,
        *,
        tags: Mapping[str, str] | None = None,
        parent: Tracker | None = None,
        run_id: str | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.experiment = experiment
        self.run_name = run_name
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._shared: _Shared = parent._shared if parent is not None else _Shared(tracking_uri(store_dir))
        self._ended = False
        if not self._shared.enabled:
            return  # tracking is already off for this run tree: stay silent
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent is not None:
            if parent.run_id is None:
                return
            all_tags[PARENT_TAG] = parent.run_id
        with self._guard("start run"):
            client = self._client()
            self.experiment_id = self._experiment_id(client, parent)
            if run_id is not None:
                client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                if all_tags:
                    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in all_tags.items()])
            else:
                run = client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
                self.run_id = run.info.run_id

    # -- plumbing -------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """False once any MLflow call failed or the store was unreachable (then all calls no-op)."""
        return self._shared.enabled and self.run_id is not None

    @property
    def tracking_uri(self) -> str:
        return self._shared.uri

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Run one MLflow call; any failure disables tracking with a single warning."""
        try:
            with warnings.catch_warnings():
                # MLflow's SQLAlchemy models trip a SQLAlchemy deprecation warning on first use;
                # it is MLflow's to fix and only clutters the CLI's output.
                warnings.filterwarnings("ignore", message=r".*noload.*")
                yield
        except Exception as error:  # any store (or plugin) failure; training must go on
            self._shared.disable(what, error)

    def _client(self) -> MlflowClient:
        shared = self._shared
        if shared.client is None:
            unreachable = _probe(shared.uri)
            if unreachable is not None:
                raise ConnectionError(f"cannot reach the tracking server: {unreachable}")
            if shared.uri.startswith(("http://", "https://")):
                for name, value in _HTTP_DEFAULTS.items():
                    os.environ.setdefault(name, value)
            if shared.uri.startswith("sqlite:"):
                self.store_dir.mkdir(parents=True, exist_ok=True)
                # Table creation logs two INFO lines per new store; not the user's business.
                logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
                logging.getLogger("alembic").setLevel(logging.WARNING)
            shared.client = MlflowClient(tracking_uri=shared.uri, registry_uri=shared.uri)
        return shared.client

    def _experiment_id(self, client: MlflowClient, parent: Tracker | None) -> str:
        if parent is not None and parent.experiment_id is not None and parent.experiment == self.experiment:
            return parent.experiment_id
        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        artifact_location = None
        if self._shared.uri.startswith("sqlite:"):
            # Without this MLflow puts artifacts in ./mlruns of whatever the working directory is.
            artifact_location = (self.store_dir.resolve() / "mlartifacts").as_uri()
        try:
            return client.create_experiment(self.experiment, artifact_location=artifact_location)
        except MlflowException:
            # Another process created it between our lookup and create.
            found = client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def _active(self) -> tuple[MlflowClient, str] | None:
        """(client, run id) while this run can log; None once disabled or ended."""
        if not self.enabled or self._ended or self._shared.client is None or self.run_id is None:
            return None
        return self._shared.client, self.run_id

    # -- the API --------------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log flat params, e.g. ``gem3d.config.flatten_config(cfg)``; lists become JSON strings."""
        active = self._active()
        if active is None or not params:
            return
        client, run_id = active
        items = [Param(str(k), _param_value(v)) for k, v in params.items()]
        with self._guard("log_params"):
            for start in range(0, len(items), _PARAM_BATCH):
                client.log_batch(run_id, params=items[start : start + _PARAM_BATCH])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics at ``step`` (a training step or a federated round).

        Values that are not real numbers (strings, None, tensors of more than one element) are
        skipped, so a caller can pass a whole metrics dict from ``on_step``.
        """
        active = self._active()
        if active is None:
            return
        client, run_id = active
        now = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            if value is None or isinstance(value, bool | str | bytes):
                continue
            try:
                number = float(value)
            except (TypeError, ValueError, RuntimeError):  # RuntimeError: a multi-element tensor
                continue
            items.append(Metric(str(key), number, now, int(step or 0)))
        if not items:
            return
        with self._guard("log_metrics"):
            for start in range(0, len(items), _METRIC_BATCH):
                client.log_batch(run_id, metrics=items[start : start + _METRIC_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set string tags on the run."""
        active = self._active()
        if active is None or not tags:
            return
        client, run_id = active
        with self._guard("set_tags"):
            client.log_batch(run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file, or a folder's contents, into the run's artifacts (under ``artifact_path``)."""
        active = self._active()
        if active is None:
            return
        client, run_id = active
        path = Path(path)
        with self._guard("log_artifact"):
            if path.is_dir():
                client.log_artifacts(run_id, str(path), artifact_path)
            else:
                client.log_artifact(run_id, str(path), artifact_path)

    def log_dict(self, payload: Mapping[str, Any], artifact_file: str) -> None:
        """Write a JSON (or YAML, by extension) report straight into the run's artifacts."""
        active = self._active()
        if active is None:
            return
        client, run_id = active
        with self._guard("log_dict"):
            client.log_dict(run_id, dict(payload), artifact_file)

    def nested(self, run_name: str, tags: Mapping[str, str] | None = None, run_id: str | None = None) -> Tracker:
        """A child run under this one (a site under the federated server), in the same experiment.

        ``run_id`` reopens an existing child (a resumed server keeps one run per site).
        """
        return Tracker(self.store_dir, self.experiment, run_name, tags=tags, parent=self, run_id=run_id)

    def register_model(self, path: str | Path, name: str, alias: str, artifact_path: str = "model") -> str | None:
        """Log ``path`` (a run folder of safetensors, or one file) and register it under ``name@alias``.

        The model version's source is the logged artifact folder; load it back with
        ``mlflow.artifacts.download_artifacts("models:/<name>@<alias>")``. MLflow 3's
        ``mlflow.register_model("runs:/...")`` accepts only MLflow "logged models" (an MLmodel
        flavour), which a plain safetensors folder is not, so the version is created directly.

        Returns:
            The new model version (a string), or None when tracking is disabled.
        """
        if self._active() is None:
            return None
        self.log_artifact(path, artifact_path)
        active = self._active()
        if active is None:
            return None
        client, run_id = active
        version: str | None = None
        with self._guard("register_model"):
            run = client.get_run(run_id)
            source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
            try:
                client.get_registered_model(name)
            except MlflowException:
                client.create_registered_model(name)
            model_version = client.create_model_version(name, source=source, run_id=run_id)
            client.set_registered_model_alias(name, alias, model_version.version)
            version = str(model_version.version)
        return version

    def end(self, status: str = "FINISHED") -> None:
        """End the run (FINISHED, FAILED or KILLED). Called by ``__exit__``; idempotent."""
        active = self._active()
        self._ended = True
        if active is None:
            return
        client, run_id = active
        with self._guard("end run"):
            client.set_terminated(run_id, status=status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.end("FINISHED" if exc_type is None else "FAILED")


def read_runs(store_dir: str | Path, experiment: str) -> list[dict[str, Any]]:
    """Read back every run of ``experiment`` as plain dicts (for summaries and tests).

    Each dict has ``run_id``, ``run_name``, ``status``, ``parent_run_id`` (None for top-level
    runs), ``params``, ``metrics`` (the latest value of each) and ``tags``. Raises
    ``MlflowException`` if the store cannot be read; returns [] if the experiment does not exist.
    """
    uri = tracking_uri(store_dir)
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = []
    page_token = None
    while True:
        page = client.search_runs([found.experiment_id], page_token=page_token)
        for run in page:
            runs.append(
                {
                    "run_id": run.info.run_id,
                    "run_name": run.info.run_name,
                    "status": run.info.status,
                    "parent_run_id": run.data.tags.get(PARENT_TAG),
                    "params": dict(run.data.params),
                    "metrics": dict(run.data.metrics),
                    "tags": dict(run.data.tags),
                }
            )
        page_token = page.token
        if not page_token:
            return runs
