"""The version manager: which versions of which models take traffic (TF Serving's ServerCore).

Sources, policies, loads, unloads and labels, as TF Serving manages them:
- layout `<base_path>/<integer version>/saved_model.pb` (`serving.loader`);
- a `ModelServerConfig` (`model_config_list`: several models, `model_version_policy` latest N /
  all / specific, `version_labels`);
- every base path is polled for new versions (what the Pusher writes). A new version is loaded
  and warmed up before it takes traffic; versions the policy no longer wants are unloaded after
  their replacements are available, and requests already running on them finish. A version that
  fails to load (a half-written or corrupt directory) is logged, shown in GetModelStatus as END
  with its error, never served, and tried again when its files change. A model keeps its
  versions when a poll finds none loadable (a vanished or emptied base path).
- `latest N` takes the N highest versions that load: a broken newest version leaves the previous
  one serving.
- a version label can point only at a version that is loaded: a config whose label names any
  other version is refused with FAILED_PRECONDITION, as in TF Serving. (TF Serving checks labels
  before loading, so labels fail at its startup; here versions are loaded first, then labels are
  checked, so a config with labels works at startup too.)
- a reload is all or nothing: new models and versions are loaded first, and nothing changes if the
  config is refused. A model added by a reload must have a loadable version (else UNKNOWN, "did
  not become available", as TF Serving answers a reload whose new model fails to load).

Requests find their version with `resolve(model_spec)` (TF Serving's GetServableHandle); the
maps they read are replaced whole, never mutated, so requests take no lock.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import time
from typing import Callable, Mapping, Optional

import grpc
import tensorflow as tf
from grpc_health.v1 import health, health_pb2
from tensorflow_serving.apis import get_model_status_pb2, model_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving import warmup
from serving.config import validate_model_server_config
from serving.loader import SAVED_MODEL_FILE, LoadedVersion, join, load_version
from serving.monitoring import LOAD_FAILURE, LOAD_SUCCESS, UNLOAD, RequestLabels, ServingMetrics, log_event
from serving.status import ServingError, one_line, status_of

logger = logging.getLogger(__name__)

State = get_model_status_pb2.ModelVersionStatus.State
Warmup = Callable[[str, LoadedVersion], int]  # (model name, version) -> requests replayed; raises on failure


@dataclasses.dataclass(frozen=True)
class VersionState:
    """A version's state as GetModelStatus reports it (state, and the error of a failed load)."""

    state: int
    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""


MAX_VERSION = 2**63 - 1  # versions are int64
AVAILABLE = VersionState(State.AVAILABLE)
UNLOADED = VersionState(State.END)


def parse_version(name: str) -> Optional[int]:
    """The version a directory name gives, or None: TF Serving takes names that parse as int64 >= 0."""
    if not (name.isascii() and name.isdigit()):
        return None
    version = int(name)
    return version if version <= MAX_VERSION else None


def version_dirs(base_path: str) -> dict[int, str]:
    """version -> directory for every subdirectory of `base_path` named by a version number."""
    found: dict[int, str] = {}
    for name in sorted(tf.io.gfile.listdir(base_path)):
        name = name.rstrip("/")  # object stores list directories as "name/"
        path = join(base_path, name)
        version = parse_version(name)
        if version is None or not tf.io.gfile.isdir(path):
            continue
        if version in found:
            logger.warning("Skipping %s: version %d is already given by %s.", path, version, found[version])
            continue
        found[version] = path
    return found


def _fingerprint(path: str) -> object:
    """Names, sizes and modification times of every file under `path`: changes while it is written."""
    try:
        entries = []
        for directory, _, files in tf.io.gfile.walk(path):
            for name in files:
                stat = tf.io.gfile.stat(join(directory, name))
                entries.append((directory, name, stat.length, stat.mtime_nsec))
        return tuple(sorted(entries))
    except tf.errors.OpError:
        return object()  # unreadable: never equal, so tried again


class _Model:
    """One configured model: its base path, policy, loaded versions and version states."""

    def __init__(self, config: model_server_config_pb2.ModelConfig):
        self.name = config.name
        self.base_path = config.base_path.rstrip("/") or "/"
        self.policy = type(config.model_version_policy)()
        self.policy.CopyFrom(config.model_version_policy)
        self.versions: dict[int, LoadedVersion] = {}  # replaced whole, never mutated: readers need no lock
        self.states: dict[int, VersionState] = {}
        self.failed: dict[int, object] = {}  # version -> fingerprint of its failed load


class VersionManager:
    """The configured models and their versions (see the module docstring).

    Args:
      metrics: where load events and available-version counts go.
      warmup: replays a freshly loaded version's warmup requests; its exception fails the load.
      health_servicer: gets each model's SERVING / NOT_SERVING status.
    """

    def __init__(self, metrics: ServingMetrics, warmup_version: Warmup,
                 health_servicer: Optional[health.HealthServicer] = None):
        self.metrics = metrics
        self._warmup = warmup_version
        self._health = health_servicer
        self._lock = threading.RLock()  # serializes config reloads and polls; requests never take it
        self._models: dict[str, _Model] = {}  # replaced whole on reload
        self._labels: dict[str, dict[str, int]] = {}  # replaced whole on reload
        self._config = model_server_config_pb2.ModelServerConfig()

    # ----------------------------------------------------------------------------------------
    # What is served.

    @property
    def model_names(self) -> list[str]:
        return sorted(self._models)

    @property
    def config(self) -> model_server_config_pb2.ModelServerConfig:
        """The config in force (a copy)."""
        config = model_server_config_pb2.ModelServerConfig()
        config.CopyFrom(self._config)
        return config

    def loaded_versions(self, model_name: str) -> dict[int, LoadedVersion]:
        """version -> LoadedVersion of the versions taking traffic ({} for an unknown model)."""
        model = self._models.get(model_name)
        return dict(model.versions) if model else {}

    def version_states(self, model_name: str) -> dict[int, VersionState]:
        model = self._models.get(model_name)
        return dict(model.states) if model else {}

    def labels(self, model_name: str) -> dict[str, int]:
        return dict(self._labels.get(model_name, {}))

    def resolve(self, model_spec: model_pb2.ModelSpec, labels: Optional[RequestLabels] = None) -> tuple[str, LoadedVersion]:
        """The model name and loaded version a request's `model_spec` names (TF Serving's errors)."""
        name = model_spec.name
        if not name:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified.")
        choice = model_spec.WhichOneof("version_choice")
        if choice == "version_label":
            version = self._labels.get(name, {}).get(model_spec.version_label)
            if version is None:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"Unrecognized servable version label: {model_spec.version_label}"
                )
        elif choice == "version":
            version = model_spec.version.value
        else:
            version = None
        model = self._models.get(name)
        if model is not None and labels is not None:
            labels.model = name
        versions = model.versions if model is not None else {}
        if version is None and versions:
            loaded = versions[max(versions)]
        elif version is not None and version in versions:
            loaded = versions[version]
        else:
            wanted = f"Latest({name})" if version is None else f"Specific({name}, {version})"
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {wanted}")
        if labels is not None:
            labels.version = str(loaded.version)
        return name, loaded

    # ----------------------------------------------------------------------------------------
    # Configs and polls.

    def load_config(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """`reload_config` for callers outside a request: refusals become ValueError."""
        try:
            self.reload_config(config)
        except ServingError as e:
            raise ValueError(e.message) from None

    def reload_config(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """Applies a ModelServerConfig, all or nothing (see the module docstring).

        Raises ServingError: INVALID_ARGUMENT for a malformed config or a new model whose base
        path does not exist, NOT_FOUND for one without version directories, UNKNOWN for one whose
        versions all fail to load, FAILED_PRECONDITION for a label naming a version that is not
        loaded. An empty config (no `model_config_list`) changes nothing, as in TF Serving.
        """
        if config.WhichOneof("config") is None:
            log_event(logger, logging.INFO, "empty_config_ignored")
            return
        try:
            validate_model_server_config(config)
        except ValueError as e:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        with self._lock:
            staged: dict[str, tuple[_Model, dict[int, LoadedVersion]]] = {}
            for model_config in config.model_config_list.config:
                model = self._models.get(model_config.name)
                if model is None or model.base_path != (model_config.base_path.rstrip("/") or "/"):
                    model = _Model(model_config)
                target = self._plan(model, model_config.model_version_policy)
                if not target and not model.versions:
                    self._discard(staged, model, target)
                    raise self._unavailable(model)
                staged[model.name] = (model, target or model.versions)
            labels: dict[str, dict[str, int]] = {}
            for model_config in config.model_config_list.config:
                model, target = staged[model_config.name]
                for label, version in sorted(model_config.version_labels.items()):
                    if version not in target:
                        self._discard(staged)
                        raise ServingError(
                            grpc.StatusCode.FAILED_PRECONDITION,
                            f"Request to assign label to version {version} of model {model.name}, "
                            "which is not currently available for inference",
                        )
                if model_config.version_labels:
                    labels[model.name] = dict(model_config.version_labels)

            for model_config in config.model_config_list.config:
                model, target = staged[model_config.name]
                model.policy.CopyFrom(model_config.model_version_policy)
                self._publish(model, target)
            previous = self._models
            self._models = {name: model for name, (model, _) in staged.items()}
            self._labels = labels
            self._config = model_server_config_pb2.ModelServerConfig()
            self._config.CopyFrom(config)
            unloaded = False
            for name, model in previous.items():
                if self._models.get(name) is model:
                    continue
                unloaded |= self._publish(model, {}, announce=name not in self._models)
                if name not in self._models:
                    self.metrics.remove_model(name)
                    if self._health is not None:
                        self._health.set(name, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            log_event(
                logger,
                logging.INFO,
                "config_applied",
                models={name: sorted(m.versions) for name, m in sorted(self._models.items())},
                labels=labels,
            )
        if unloaded:
            gc.collect()

    def poll(self) -> None:
        """Looks for new and removed versions of every model once, and applies the policies."""
        unloaded = False
        with self._lock:
            for model in list(self._models.values()):
                try:
                    target = self._plan(model, model.policy)
                except Exception:  # a poll must never stop polling
                    logger.exception("Polling %s failed", model.base_path)
                    continue
                if not target:
                    continue  # keep serving what is loaded (see the module docstring)
                if set(target) != set(model.versions):
                    unloaded |= self._publish(model, target)
                    self._warn_unloaded_labels(model)
        if unloaded:
            gc.collect()

    def _plan(self, model: _Model, policy) -> dict[int, LoadedVersion]:
        """The versions `policy` keeps, loading those not loaded yet; {} when none loads."""
        try:
            dirs = version_dirs(model.base_path)
        except tf.errors.OpError as e:
            log_event(logger, logging.WARNING, "base_path_unreadable", model=model.name, path=model.base_path,
                      error=one_line(e.message))
            return {}
        kind = policy.WhichOneof("policy_choice") or "latest"
        limit = None
        if kind == "specific":
            wanted = sorted(set(policy.specific.versions), reverse=True)
        else:
            wanted = sorted(dirs, reverse=True)
            if kind == "latest":
                limit = max(policy.latest.num_versions, 1)
        target: dict[int, LoadedVersion] = {}
        for version in wanted:
            if limit is not None and len(target) >= limit:
                break
            path = dirs.get(version)
            if path is None:
                continue
            loaded = model.versions.get(version) or self._load(model, version, path)
            if loaded is not None:
                target[version] = loaded
        return target

    def _load(self, model: _Model, version: int, path: str) -> Optional[LoadedVersion]:
        """Loads and warms up one version; None (and an END state with the error) on failure."""
        fingerprint = _fingerprint(path)
        if model.failed.get(version) == fingerprint:
            return None  # failed before and unchanged since
        model.states[version] = VersionState(State.LOADING)
        log_event(logger, logging.INFO, "version_loading", model=model.name, version=version, path=path)
        started = time.monotonic()
        stage = "load"
        try:
            loaded = load_version(version, path)
            stage = "warmup"
            replayed = self._warmup(model.name, loaded)
        except Exception as e:  # a bad version must never take the server down
            code, message = status_of(e, default=grpc.StatusCode.UNKNOWN)
            if stage == "warmup":
                message = f"Warmup ({warmup.warmup_file(path)}) failed: {message}"
            model.failed[version] = fingerprint
            model.states[version] = VersionState(State.END, code, message)
            self.metrics.load_event(model.name, LOAD_FAILURE)
            log_event(logger, logging.WARNING, "version_load_failed", model=model.name, version=version, path=path,
                      code=code.name, error=message)
            return None
        model.failed.pop(version, None)
        self.metrics.load_event(model.name, LOAD_SUCCESS)
        log_event(logger, logging.INFO, "version_loaded", model=model.name, version=version, path=path,
                  warmup_requests=replayed, seconds=round(time.monotonic() - started, 3))
        return loaded

    def _publish(self, model: _Model, target: Mapping[int, LoadedVersion], announce: bool = True) -> bool:
        """Makes `target` the versions taking traffic; returns whether any version was unloaded."""
        previous = model.versions
        model.versions = dict(target)
        for version in sorted(target):
            model.states[version] = AVAILABLE
            if version not in previous:
                log_event(logger, logging.INFO, "version_available", model=model.name, version=version)
        unloaded = sorted(set(previous) - set(target))
        for version in unloaded:
            model.states[version] = UNLOADED
            self.metrics.load_event(model.name, UNLOAD)
            log_event(logger, logging.INFO, "version_unloaded", model=model.name, version=version)
        if announce:
            self.metrics.set_versions_available(model.name, len(target))
            if self._health is not None:
                status = health_pb2.HealthCheckResponse.SERVING if target else health_pb2.HealthCheckResponse.NOT_SERVING
                self._health.set(model.name, status)
        return bool(unloaded)

    @staticmethod
    def _discard(staged, model: Optional[_Model] = None, target: Optional[Mapping] = None) -> None:
        """Forgets versions loaded for a refused config (their states become END)."""
        pending = [(m, t) for m, t in staged.values()]
        if model is not None:
            pending.append((model, target or {}))
        for m, t in pending:
            for version in t:
                if version not in m.versions:
                    m.states[version] = UNLOADED

    @staticmethod
    def _unavailable(model: _Model) -> ServingError:
        """Why a new model has no version to serve, with TF Serving's codes."""
        expected = f"expected {join(model.base_path, '<version>')}/{SAVED_MODEL_FILE} with an integer <version>"
        if not tf.io.gfile.isdir(model.base_path):
            return ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"Could not find base path {model.base_path} for servable {model.name}; {expected}.")
        try:
            found = version_dirs(model.base_path)
        except tf.errors.OpError:
            found = {}
        if not found:
            return ServingError(
                grpc.StatusCode.NOT_FOUND,
                f"Unable to find a numerical version path for servable {model.name} at: {model.base_path}; {expected}.",
            )
        failures = "; ".join(
            f"version {v}: {s.code.name}: {s.message}"
            for v, s in sorted(model.states.items())
            if s.code != grpc.StatusCode.OK
        )
        return ServingError(
            grpc.StatusCode.UNKNOWN,
            f"Model {model.name} did not become available: no loadable version under {model.base_path}"
            f"{' (' + failures + ')' if failures else ''}; {expected}.",
        )

    def _warn_unloaded_labels(self, model: _Model) -> None:
        for label, version in sorted(self._labels.get(model.name, {}).items()):
            if version not in model.versions:
                log_event(logger, logging.WARNING, "label_points_to_unloaded_version", model=model.name,
                          label=label, version=version)
