"""`--track mlflow`: log a finished run folder as one MLflow run (params, headline metrics, tags, artifacts).

The run folder stays the record; MLflow gets a copy once the folder is complete, so a store that
cannot be reached costs nothing but the copy. MLflow is imported only here, inside functions:
importing capsbench never imports it. The default store is ``./mlruns`` (a SQLite database and
an artifacts folder), since MLflow 3 refuses its plain file store unless MLFLOW_ALLOW_FILE_STORE is set.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from capsbench.core.errors import CapsbenchError
from capsbench.report.document import flatten, param_count
from capsbench.report.headline import headline_metrics
from capsbench.report.folder import Run, read_run

TRACKERS = ("mlflow",)
INSTALL = 'pip install -e ".[mlflow]" (or pip install mlflow)'
ARTIFACTS = ("summary.md", "report.md", "report.html", "claims.csv", "config.toml", "env.json")  # and tables/, plots/
MAX_PARAM_VALUE = 6000  # MLflow 3's limit on a param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
DATABASES = ("sqlite", "postgresql", "mysql", "mssql")  # the URI schemes of MLflow's SQLAlchemy store
MAX_PER_BATCH = 100  # MLflow's limit on params (and tags) in one log_batch request


def open_tracker(kind: str | None, uri: str | None) -> MlflowTracker | None:
    """The tracker for ``--track KIND [--track-uri URI]``, or None without --track. Checks the
    arguments and that MLflow imports, before any training; creates no file or folder."""
    if kind is None:
        if uri is not None:
            raise CapsbenchError("--track-uri needs --track mlflow; add it, or leave out --track-uri")
        return None
    if kind not in TRACKERS:
        raise CapsbenchError(f"unknown tracker {kind!r}; known trackers: {', '.join(TRACKERS)}")
    if uri is not None and not uri.strip():
        raise CapsbenchError("--track-uri is empty; give a tracking URI (http://host:5000, sqlite:///path/mlflow.db) "
                             "or leave it out for ./mlruns")  # fmt: skip
    try:
        import mlflow  # noqa: F401 - fails here, not after the run, when MLflow is missing or broken
    except ImportError as e:
        raise CapsbenchError(f"--track mlflow needs MLflow ({e}): {INSTALL}") from None
    return MlflowTracker(uri) if uri else default_store(Path.cwd())


def default_store(cwd: Path) -> MlflowTracker:
    """``<cwd>/mlruns``: SQLite at mlruns/mlflow.db, artifacts under mlruns/artifacts (absolute paths,
    so a later change of directory does not move the store)."""
    root = cwd.resolve() / "mlruns"
    return MlflowTracker(f"sqlite:///{(root / 'mlflow.db').as_posix()}", root / "artifacts")


@dataclass(frozen=True)
class MlflowTracker:
    """One MLflow tracking store; ``artifact_root`` (the default store only) is where experiments it
    creates keep their artifacts, else the store decides (a server's artifact root, ./mlruns for SQLite)."""

    uri: str
    artifact_root: Path | None = None

    def log(self, folder: Path, suite: str) -> str:
        """Log the finished run folder as one MLflow run in experiment ``capsbench-<suite>``; returns
        a one-line description (store, experiment, run id). A store error becomes a CapsbenchError."""
        from mlflow.exceptions import MlflowException

        run = read_run(folder, "R1")
        name = f"capsbench-{suite}"
        try:
            return self._log(run, suite, name)
        except (MlflowException, OSError, ImportError, *_sqlalchemy_errors()) as e:
            raise store_error(e, self.uri, folder) from None

    def _log(self, run: Run, suite: str, name: str) -> str:
        from mlflow import MlflowClient

        if self.artifact_root is not None:
            self.artifact_root.parent.mkdir(parents=True, exist_ok=True)  # SQLite needs the database's folder
        client = MlflowClient(tracking_uri=self.uri)
        experiment = self._experiment(client, name)
        start = started_ms(run)
        run_id = client.create_run(experiment, start, tags(run, suite), run_name=run.folder.name).info.run_id
        try:
            log_values(client, run_id, params(run), metrics(run))
            log_artifacts(client, run_id, run.folder)
        except BaseException:
            _terminate_quietly(client, run_id)
            raise
        client.set_terminated(run_id, "FINISHED")
        view = f"; view it with: mlflow ui --backend-store-uri {self.uri}" if self.artifact_root is not None else ""
        return f"MLflow run {run_id} ({run.folder.name}) in experiment {name} at {self.uri}{view}"

    def _experiment(self, client: Any, name: str) -> str:
        """The id of experiment ``name``, created when missing (another process may create it first)."""
        from mlflow.exceptions import MlflowException

        found = client.get_experiment_by_name(name)
        if found is None:
            where = (self.artifact_root / name).as_uri() if self.artifact_root is not None else None
            try:
                return client.create_experiment(name, artifact_location=where)
            except MlflowException:
                found = client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.lifecycle_stage != "active":
            restore = f"mlflow experiments restore --experiment-id {found.experiment_id}"
            raise CapsbenchError(f"MLflow experiment {name} is deleted in {self.uri}; restore it ({restore}) "
                                 "or purge it (mlflow gc)")  # fmt: skip
        return found.experiment_id


def store_error(e: Exception, uri: str, folder: Path) -> CapsbenchError:
    """The one-line error for a store that failed: MLflow's reason, that the folder is safe, what to change."""
    why = (str(e).strip().splitlines() or [""])[0][:300]
    database = uri.split(":", 1)[0].split("+", 1)[0] in DATABASES
    if isinstance(e, ImportError) or (database and not _sqlalchemy_errors()):  # mlflow-skinny has no SQLAlchemy
        fix = f"a database store ({uri.split(':', 1)[0]}) needs the full MLflow package, not mlflow-skinny: {INSTALL}"
    elif "MLFLOW_ALLOW_FILE_STORE" in str(e):
        fix = ("MLflow 3 refuses file stores: use --track-uri sqlite:///PATH/mlflow.db, "
               "or set MLFLOW_ALLOW_FILE_STORE=true")
    else:
        fix = "check --track-uri, or that the server is up"
    return CapsbenchError(f"could not log to MLflow at {uri} ({type(e).__name__}: {why}); "
                          f"the results are safe in {folder}; {fix}")  # fmt: skip


def _sqlalchemy_errors() -> tuple[type[BaseException], ...]:
    """SQLAlchemy's base error, where installed (a database store's errors are not all wrapped by MLflow)."""
    try:
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError:
        return ()
    return (SQLAlchemyError,)


def _terminate_quietly(client: Any, run_id: str) -> None:
    """Mark a half-logged run FAILED where the store still answers; the original error is the one to report."""
    try:
        client.set_terminated(run_id, "FAILED")
    except Exception:  # noqa: BLE001 - already failing; do not mask the first error
        pass


# --- what a run folder becomes in MLflow ------------------------------------------------------


def key(name: str) -> str:
    """``name`` with the characters MLflow refuses in param and metric keys replaced by '_'."""
    return re.sub(r"[^\w.\- /]", "_", name)


def params(run: Run) -> dict[str, str]:
    """The resolved config flattened (``train.steps``); lists as their string form, values cut to MLflow's limit."""
    return {key(k): str(v)[:MAX_PARAM_VALUE] for k, v in flatten(run.config).items()}


def tags(run: Run, suite: str) -> dict[str, str]:
    """Suite, preset, seeds, device, git commit and capsbench version (env.json), and the run folder."""
    env = run.env
    commit = str(env.get("git_commit", "unknown"))
    out = {"suite": suite, "preset": run.preset, "seeds": ",".join(map(str, run.seeds)),
           "device": str(env.get("device", "?")), "device_name": str(env.get("device_name", "?")),
           "git_commit": commit, "version": str(env.get("capsbench", "?")), "torch": str(env.get("torch", "?")),
           "run_folder": str(run.folder.resolve())}  # fmt: skip
    out = {f"capsbench.{k}": v for k, v in out.items()}
    if commit != "unknown":
        out["mlflow.source.git.commit"] = commit.removesuffix("+dirty")  # the UI's own commit field
    return out


def metrics(run: Run) -> dict[str, float]:
    """The report's headline numbers (document.headline) per model, as ``<metric>/<model>``:
    parameters, how it was trained, then clean accuracy and every headline number the run's parts
    declare (accuracies as fractions, the mean over seeds; images/s); missing and NaN left out."""
    from capsbench.parts import load_parts

    load_parts()  # the parts declare their headline numbers when they register
    t, parts = run.tables, list(run.config.get("parts", []))
    out: dict[str, float | None] = {}
    for m in run.config.get("models", []):
        out[f"params/{m}"] = param_count(run, m)
        out[f"trained_accuracy/{m}"] = _column_mean(t.get("models"), m, "test_accuracy")
        out[f"trained_epochs/{m}"] = _column_mean(t.get("models"), m, "epochs")
        out.update(headline_metrics(t, m, parts))
    return {key(k): float(v) for k, v in out.items() if v is not None and math.isfinite(v)}


def _column_mean(df: Any, model: str, column: str) -> float | None:
    if df is None or df.empty or column not in df.columns or not (df.model == model).any():
        return None
    return float(df.loc[df.model == model, column].astype(float).mean())


def started_ms(run: Run) -> int | None:
    """The run's start (env.json started_utc) in ms since the epoch, so MLflow shows when it ran."""
    try:
        return int(datetime.fromisoformat(str(run.env["started_utc"])).timestamp() * 1000)
    except (KeyError, ValueError):
        return None


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def log_values(client: Any, run_id: str, params_: dict[str, str], metrics_: dict[str, float]) -> None:
    """Params and metrics in batches MLflow accepts (at most 100 params per request)."""
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    for batch in _batches([Param(k, v) for k, v in params_.items()], MAX_PER_BATCH):
        client.log_batch(run_id, params=batch, synchronous=True)
    for batch in _batches([Metric(k, v, now, 0) for k, v in metrics_.items()], MAX_PER_BATCH):
        client.log_batch(run_id, metrics=batch, synchronous=True)


def log_artifacts(client: Any, run_id: str, folder: Path) -> None:
    """tables/, plots/ and the folder's summary, reports, claims, config and environment, where present."""
    for sub in ("tables", "plots"):
        if (folder / sub).is_dir():
            client.log_artifacts(run_id, str(folder / sub), artifact_path=sub)
    for name in ARTIFACTS:
        if (folder / name).is_file():
            client.log_artifact(run_id, str(folder / name))
