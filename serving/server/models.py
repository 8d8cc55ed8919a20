"""Which model versions are served: loading, repository watching and hot swaps without failed requests.

A `ModelSource` says which versions of one model exist: a model repository folder
(``REPO/NAME/<version>/model.onnx + manifest.json``, see `serving.repository`) or an exported run
directory served as version 1. The `ModelManager` loads each source's highest version (backend
created, loaded and warmed up, batcher started) before the server reports ready, then polls the
sources: when the highest version present changes (a new one renamed into place, or the newest
deleted to roll back), it loads that version next to the old one and swaps the reference. Requests
hold a lease on the version they started with, so a swap never fails one: new requests go to the
new version at once, and the old version is closed only after its last lease is returned. A version
that fails to load is logged and counted and the old one keeps serving; it is retried only when its
folder changes. A version whose ``model.onnx`` does not match the SHA-256 its manifest records
(``onnx_sha256``, written by the export) is refused: the folder mixes two exports.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from parsimony.errors import ManifestError
from parsimony.layout import newest_version
from parsimony.manifest import Manifest, sha256_file
from serving import repository as repo_layout
from serving.server import triton_backend  # noqa: F401  (registers the "triton" backend)
from serving.server.backend import BACKENDS, Backend, create_backend  # noqa: F401  (BACKENDS: for the config)
from serving.server.batcher import DynamicBatcher
from serving.server.config import default
from serving.server.errors import ModelLoadError, ModelNotFound, ModelNotReady, shown
from serving.server.metadata import ModelMetadata
from serving.server.metrics import GatewayMetrics

log = logging.getLogger("serving.server")


class ModelSource(Protocol):
    name: str

    def latest(self) -> int | None:
        """The highest version present (None when there is none)."""

    def read(self, version: int) -> tuple[Path, Manifest]:
        """The version's folder and its manifest."""


@dataclass(frozen=True)
class RepositorySource:
    repository: Path
    name: str

    def __str__(self) -> str:
        return str(Path(self.repository) / self.name)

    def latest(self) -> int | None:
        return newest_version(repo_layout.model_dir(self.repository, self.name))

    def read(self, version: int) -> tuple[Path, Manifest]:
        found = repo_layout.read_version(self.repository, self.name, version)
        return found.path, found.manifest


@dataclass(frozen=True)
class RunSource:
    """An exported run directory (``model.onnx`` + ``manifest.json``), served as version 1."""

    run_dir: Path
    name: str

    def __str__(self) -> str:
        return str(self.run_dir)

    def latest(self) -> int | None:
        return 1

    def read(self, version: int) -> tuple[Path, Manifest]:
        return self.run_dir, Manifest.load(self.run_dir)


def repository_models(repository: Path) -> list[str]:
    """Names of the models in ``repository`` that have at least one version."""
    repository = Path(repository)
    if not repository.is_dir():
        raise ModelLoadError(f"model repository {repository} does not exist; create it with `python -m serving.convert`")
    return sorted(p.name for p in repository.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and repo_layout.versions(repository, p.name))


@dataclass(frozen=True)
class BatchingOptions:
    max_batch: int = default("max_batch")
    max_delay_s: float = default("max_queue_delay_ms") / 1e3
    max_queue: int = default("max_queue")


class ServedModel:
    """One loaded version: its backend, its batcher, and the leases of requests running on it.

    ``with served:`` holds a lease; `retire` waits for the last lease before closing the version.
    """

    def __init__(self, backend: Backend, batcher: DynamicBatcher) -> None:
        self.backend = backend
        self.batcher = batcher
        self.metadata: ModelMetadata = backend.metadata
        self._leases = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __enter__(self) -> ServedModel:
        self._leases += 1
        self._idle.clear()
        return self

    def __exit__(self, *exc) -> None:
        self._leases -= 1
        if self._leases == 0:
            self._idle.set()

    async def retire(self) -> None:
        await self._idle.wait()
        await self.batcher.close()
        await self.backend.close()


@dataclass
class ModelManager:
    sources: Sequence[ModelSource]
    metrics: GatewayMetrics
    backend: str = default("backend")
    backend_options: dict = field(default_factory=dict)
    batching: BatchingOptions = field(default_factory=BatchingOptions)
    poll_interval_s: float = default("poll_interval_s")

    def __post_init__(self) -> None:
        self._sources = {s.name: s for s in self.sources}
        self._models: dict[str, ServedModel] = {}
        self._failed: dict[str, tuple[int, float]] = {}  # name -> (version, folder mtime) that failed
        self._retiring: set[asyncio.Task] = set()
        self._watcher: asyncio.Task | None = None

    @property
    def names(self) -> list[str]:
        return list(self._sources)

    @property
    def ready(self) -> bool:
        """Every model is loaded and its backend can run requests now (a remote backend can go away)."""
        return not self.not_ready()

    def not_ready(self) -> dict[str, str]:
        """Model name -> why it cannot serve now, for the models that cannot."""
        reasons = {}
        for name in self._sources:
            model = self._models.get(name)
            if model is None:
                reasons[name] = "loading"
            elif not model.backend.ready:
                reasons[name] = model.backend.not_ready_reason
        return reasons

    def served(self) -> list[ServedModel]:
        return [self._models[n] for n in self._sources if n in self._models]

    def lease(self, name: str) -> ServedModel:
        """The served version of ``name``, to be used as ``with manager.lease(name) as model:``."""
        model = self._models.get(name)
        if model is not None:
            return model
        if name in self._sources:
            raise ModelNotReady(f"model {name!r} is still loading; retry shortly (GET /readyz says when it is ready)")
        raise ModelNotFound(f"no model {shown(name)} is served here; served models: {self.names}")

    async def start(self) -> None:
        """Load every source's highest version (raises `ModelLoadError`), then start watching."""
        for source in self.sources:
            version = source.latest()
            if version is None:
                raise ModelLoadError(
                    f"model {source.name!r} has no version to serve in {source}; convert a run into the repository "
                    f"with `python -m serving.convert RUN_DIR --repository REPO --name {source.name}`")
            self._install(source.name, await self._load(source, version))
        if self.poll_interval_s > 0:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="model-watcher")

    def flush(self) -> None:
        """Draining: run queued requests at once instead of holding batches to fill."""
        for model in self._models.values():
            model.batcher.flush()

    async def close(self) -> None:
        """Stop watching; close every version once its requests have finished."""
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        models, self._models = list(self._models.values()), {}
        await asyncio.gather(*(m.retire() for m in models), *self._retiring)

    async def _load(self, source: ModelSource, version: int) -> ServedModel:
        try:
            path, manifest = source.read(version)
            metadata = ModelMetadata.from_manifest(source.name, version, manifest)
        except (repo_layout.RepositoryError, ManifestError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"model {source.name!r} version {version}: {exc}") from exc
        await asyncio.to_thread(check_graph_digest, path, manifest)
        backend = create_backend(self.backend, path, metadata, max_batch_size=self.batching.max_batch,
                                 **self.backend_options)
        try:
            await backend.load()
        except BaseException:
            await backend.close()  # release what the backend holds (its worker thread) before giving up
            raise
        batcher = DynamicBatcher(backend, max_batch=self.batching.max_batch, max_delay_s=self.batching.max_delay_s,
                                 max_queue=self.batching.max_queue, concurrency=backend.concurrent_batches,
                                 on_batch=self.metrics.batch_observer(source.name))
        batcher.start()
        return ServedModel(backend, batcher)

    def _install(self, name: str, model: ServedModel) -> None:
        old = self._models.get(name)
        self._models[name] = model
        meta = model.metadata
        self.metrics.model_loaded(name, meta.version, model.backend.kind, meta.task_names, (meta.height, meta.width),
                                  lambda: model.batcher.depth, lambda: float(model.backend.ready))
        if old is not None:
            task = asyncio.get_running_loop().create_task(old.retire())
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            log.info("model %s: swapped version %d -> %d", name, old.metadata.version, meta.version)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            for source in self.sources:
                try:
                    await self._refresh(source)
                except Exception:  # keep watching whatever one poll hit (a vanished folder, a full disk)
                    log.exception("model %s: checking for new versions failed", source.name)

    async def _refresh(self, source: ModelSource) -> None:
        latest, current = source.latest(), self._models.get(source.name)
        if latest is None or current is None or latest == current.metadata.version:
            return
        stamp = (latest, _mtime(source, latest))
        if self._failed.get(source.name) == stamp:
            return
        log.info("model %s: loading version %d (serving %d meanwhile)", source.name, latest, current.metadata.version)
        try:
            model = await self._load(source, latest)
        except Exception as exc:
            self._failed[source.name] = stamp
            self.metrics.model_loads.labels(source.name, "failure").inc()
            log.error("model %s: version %d failed to load, still serving version %d: %s",
                      source.name, latest, current.metadata.version, exc)
            return
        self._install(source.name, model)


def check_graph_digest(version_dir: Path, manifest: Manifest) -> None:
    """Refuse a version whose ``model.onnx`` is not the graph its manifest describes (``onnx_sha256``).

    Manifests written before the digest existed have no ``onnx_sha256`` and are not checked; nor is a
    version without ``model.onnx`` (a TensorRT plan served by Triton)."""
    expected = manifest.onnx_sha256  # None: an export from before the digest
    graph = Path(version_dir) / manifest.onnx_file
    if expected is None or not graph.is_file():
        return
    actual = sha256_file(graph)
    if actual != expected:
        raise ModelLoadError(
            f"{graph} does not match its manifest: its SHA-256 is {actual} but manifest.json's "
            f"onnx_sha256 is {expected}; the folder mixes two exports: export the run again and convert it "
            f"into a new version")


def _mtime(source: ModelSource, version: int) -> float:
    if isinstance(source, RepositorySource):
        try:
            return (repo_layout.model_dir(source.repository, source.name) / str(version)).stat().st_mtime
        except OSError:
            return 0.0
    return 0.0
