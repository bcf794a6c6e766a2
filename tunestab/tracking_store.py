"""The MLflow tracking store a search logs to, checked before Ray starts: where its URI resolves,
whether it can be used, and where a new experiment keeps its artifacts. Light: MLflow itself is
imported only to try a database store, so `--dry-run` and the space checks stay fast."""

from __future__ import annotations

import os
import urllib.parse
import urllib.request


class TrackingError(RuntimeError):
    pass


def resolve_uri(uri: str, storage: str) -> str:
    """A relative SQLite path lives in the storage folder, beside the Tune results."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.join(os.path.abspath(os.path.expanduser(storage)), uri[len("sqlite:///") :])
    return uri


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail before any trial runs when the tracking store cannot be used."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
                if r.status != 200:
                    raise TrackingError(f"tracking server {uri} answered /health with HTTP {r.status}")
        except OSError as e:
            raise TrackingError(f"tracking server {uri} is not reachable: {getattr(e, 'reason', e)}") from None
    elif scheme == "sqlite":
        folder = os.path.dirname(uri[len("sqlite:///") :]) or "."
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"cannot create the folder of the tracking database {uri}: {e.strerror}") from None
        if not os.access(folder, os.W_OK):
            raise TrackingError(f"the folder of the tracking database {uri} is not writable")
    elif scheme in ("", "file"):
        raise TrackingError(
            f"tracking URI {uri!r}: MLflow 3 refuses the file store; use sqlite:///PATH or http://HOST:PORT"
        )
    elif scheme.split("+")[0] in ("postgresql", "mysql", "mssql"):
        # A database store: MLflow's own client connects (and creates its tables if needed).
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as e:
            why = (str(e).splitlines() or [type(e).__name__])[0][:200]
            password = urllib.parse.urlsplit(uri).password
            if password:
                why = why.replace(password, "***")
            raise TrackingError(f"tracking database {redact(uri)} is not usable: {type(e).__name__}: {why}") from None
    elif scheme != "databricks":
        raise TrackingError(f"tracking URI {redact(uri)!r}: unknown scheme {scheme!r}")


def redact(uri: str) -> str:
    """The URI without its password, for messages."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


def artifact_location(tracking_uri: str, storage: str) -> str | None:
    """Where a new experiment keeps its artifacts. With a database store MLflow's default is
    ./mlruns in whatever folder the command ran from; ours go beside the database, in the
    storage folder. A tracking server decides for itself (None)."""
    if urllib.parse.urlparse(tracking_uri).scheme in ("http", "https", "databricks"):
        return None
    return os.path.join(os.path.abspath(os.path.expanduser(storage)), "mlartifacts")
