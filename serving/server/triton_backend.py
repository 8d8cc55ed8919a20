"""The gateway in front of a Triton Inference Server: `TritonBackend` (``--backend triton``).

The gateway keeps everything around the forward pass (decoding, validation, dynamic batching,
metrics, and for raw graphs the post-processing) and sends each batch to Triton with tritonclient's
async gRPC API (uint8 pixels for a final graph, whose outputs are the answers already); Triton runs it on its own instances (TensorRT on a GPU in production, the converter's
ONNX or python-backend models elsewhere). Both read the same model repository: the gateway reads
each version's ``manifest.json`` (tasks, class names, input size), Triton the model files.

- **Outputs by name.** Every request names the outputs it wants (`InferRequestedOutput`: only those
  the batch's calls need, so Triton sends nothing else) and reads them back by name,
  so Triton may answer in any order and a model with extra outputs is still served.
- **Versions.** `load` waits until Triton reports *this* version ready (Triton loads a new version
  on its own, from its repository poll or an explicit load; the gateway only ever follows, so it
  swaps to version N+1 once Triton serves it). Requests do not pin a version: with the converter's
  "latest 1" version policy Triton unloads the old version as soon as the new one is ready, and a
  pinned request arriving in between would fail. Around a swap a response can therefore carry the
  previous version number for the length of one poll.
- **Deadlines.** A batch is given the latest deadline of its requests as its client-side timeout;
  when it passes the batch fails with DEADLINE_EXCEEDED (the batcher already expired requests whose
  own deadlines passed).
- **Retries.** UNAVAILABLE (a connection reset, Triton restarting) is retried with exponential
  backoff and jitter, at most ``retries`` times and never past the deadline; then the batch fails
  with UNAVAILABLE (503), which clients retry.
- **Health.** A monitor task asks Triton every ``health_interval_s`` whether it is live and the
  model has a ready version. While they are not, `ready` is False: the gateway reports not-ready
  (``/readyz`` 503, gRPC health NOT_SERVING, so Kubernetes takes the pod out of its Service) and
  answers predictions with UNAVAILABLE at once instead of queueing them. When Triton is back the
  monitor notices and the gateway serves again; nothing has to be restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput, aio
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from parsimony.spec import INPUT_NAME
from serving.server.backend import Backend, register_backend
from serving.server.config import default
from serving.server.errors import BackendUnavailable, DeadlineExceeded, GatewayError, ModelLoadError
from serving.server.metadata import ModelMetadata

log = logging.getLogger("serving.server")

UNAVAILABLE, DEADLINE = "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"
MAX_MESSAGE = 2**31 - 1  # batches of large images exceed gRPC's 4 MiB default


@register_backend("triton")
class TritonBackend(Backend):
    """One model served by the Triton server at ``url`` (``host:port`` of its gRPC endpoint)."""

    def __init__(self, version_dir: Path, metadata: ModelMetadata, *, url: str, max_batch_size: int = default("max_batch"),
                 concurrency: int = default("triton_concurrency"),
                 load_timeout_s: float = default("triton_load_timeout_s"), health_interval_s: float = 1.0,
                 retries: int = 3, retry_backoff_s: float = 0.05, call_timeout_s: float = default("max_deadline_s"),
                 warmup_batch_sizes: Sequence[int] = default("warmup_batch_sizes")) -> None:
        super().__init__(metadata, max_batch_size=max_batch_size)
        self.url = url
        self.concurrent_batches = concurrency
        self.load_timeout_s = load_timeout_s
        self.health_interval_s = health_interval_s
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.call_timeout_s = call_timeout_s
        self.warmup_batch_sizes = warmup_batch_sizes
        self._input_type = np_to_triton_dtype(np.dtype(metadata.input_dtype))  # UINT8 or FP32
        self._client = None
        self._loaded = False
        self._healthy = False
        self._reason = "not loaded yet"
        self._monitor: asyncio.Task | None = None
        self._wake_monitor = asyncio.Event()

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def ready(self) -> bool:
        return self._loaded and self._healthy

    @property
    def not_ready_reason(self) -> str:
        return "" if self.ready else self._reason

    async def load(self) -> None:
        # round robin over every address the URL resolves to: with ``dns:///triton-headless:8001`` calls
        # spread over all Triton replicas instead of sticking to the one the connection reached
        options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE),
                   ("grpc.lb_policy_name", "round_robin")]
        self._client = aio.InferenceServerClient(self.url, channel_args=options)
        started = time.perf_counter()
        await self._wait_for_model(started + self.load_timeout_s)
        await self._check_config()
        self._healthy = True
        for batch in self.warmup_batch_sizes:
            if batch <= self.max_batch_size:
                await self.infer(self.metadata.blank_batch(batch), self.metadata.io_spec.output_names)
        self._loaded = True
        self._monitor = asyncio.get_running_loop().create_task(self._watch_health(), name=f"triton-health-{self.name}")
        log.info("model %s version %d: served by Triton at %s (max batch %d, %d batches in flight), ready in %.2f s",
                 self.name, self.metadata.version, self.url, self.max_batch_size, self.concurrent_batches,
                 time.perf_counter() - started)

    async def _wait_for_model(self, give_up: float) -> None:
        waited_since = time.perf_counter()
        while True:
            ready, reason = await self._probe(str(self.metadata.version))
            if ready:
                return
            if time.perf_counter() > give_up:
                await self.close()
                raise ModelLoadError(
                    f"Triton at {self.url} did not report model {self.name!r} version {self.metadata.version} ready "
                    f"within {self.load_timeout_s:.0f} s ({reason}); check that Triton serves the same repository and that its log shows the model "
                    f"loaded (raise --triton-load-timeout-s for slow engine loads)")
            if time.perf_counter() - waited_since > 10:
                log.info("model %s: waiting for Triton at %s (%s)", self.name, self.url, reason)
                waited_since = time.perf_counter()
            await asyncio.sleep(0.5)

    async def _check_config(self) -> None:
        """Triton's config must have the manifest's input and every output; its max batch caps ours."""
        config = (await self._client.get_model_config(self.name, client_timeout=self.call_timeout_s)).config
        inputs = [(i.name, mc.DataType.Name(i.data_type)) for i in config.input]
        outputs = {o.name for o in config.output}
        missing = [n for n in self.metadata.io_spec.output_names if n not in outputs]
        want = [(INPUT_NAME, f"TYPE_{self._input_type}")]
        if inputs != want or missing:
            await self.close()
            raise ModelLoadError(
                f"Triton's model {self.name!r} does not match the repository manifest of version "
                f"{self.metadata.version}: inputs {inputs} (want {want}), outputs missing {missing}; "
                f"Triton serves another repository or an older conversion")
        if config.max_batch_size < 1:
            self.max_batch_size = 1
        else:
            self.max_batch_size = min(self.max_batch_size, config.max_batch_size)

    async def _probe(self, version: str = "") -> tuple[bool, str]:
        """(ready, why not): Triton is live and serves the model (``version`` "": any version).

        Not Triton's own server readiness: that is false whenever any model of its repository is
        loading, e.g. while it loads our next version next to the one serving us."""
        try:
            if not await self._client.is_server_live(client_timeout=2.0):
                return False, f"Triton at {self.url} is not live"
            if not await self._client.is_model_ready(self.name, version, client_timeout=2.0):
                which = f"version {version}" if version else "version"
                return False, f"Triton at {self.url} has no ready {which} of model {self.name!r}"
        except InferenceServerException as exc:
            return False, f"Triton at {self.url} does not answer ({_short(exc)})"
        return True, ""

    async def _watch_health(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake_monitor.wait(), self.health_interval_s)
            self._wake_monitor.clear()
            try:
                healthy, reason = await self._probe()
            except Exception as exc:  # keep watching whatever a probe hit
                healthy, reason = False, f"health check failed: {exc!r}"
            if healthy != self._healthy:
                if healthy:
                    log.info("model %s: Triton at %s is ready again; serving", self.name, self.url)
                else:
                    log.warning("model %s: not ready: %s", self.name, reason)
            self._healthy, self._reason = healthy, reason

    def _mark_unavailable(self, reason: str) -> None:
        if self._healthy:
            log.warning("model %s: not ready: %s", self.name, reason)
        self._healthy, self._reason = False, reason
        self._wake_monitor.set()  # re-check at once, so recovery is noticed within one probe

    async def infer(self, batch: np.ndarray, outputs: Sequence[str],
                    deadline: float | None = None) -> dict[str, np.ndarray]:
        names = list(outputs)
        tensor = InferInput(INPUT_NAME, list(batch.shape), self._input_type)
        tensor.set_data_from_numpy(np.ascontiguousarray(batch))
        wanted = [InferRequestedOutput(n) for n in names]
        attempt = 0
        while True:
            timeout = self.call_timeout_s if deadline is None else deadline - time.perf_counter()
            if timeout <= 0:
                raise DeadlineExceeded("the request's deadline passed while the gateway was retrying Triton")
            try:
                result = await self._client.infer(self.name, [tensor], outputs=wanted, client_timeout=timeout)
                return {n: result.as_numpy(n) for n in names}
            except InferenceServerException as exc:
                status = exc.status()
                if status == DEADLINE:
                    raise DeadlineExceeded(
                        f"Triton did not answer before the request's deadline ({timeout * 1e3:.0f} ms left when "
                        f"sent); allow more time or add Triton capacity") from exc
                if status != UNAVAILABLE:
                    raise GatewayError(f"Triton failed the batch ({status}: {_short(exc)})") from exc
                if attempt == self.retries:
                    self._mark_unavailable(f"Triton at {self.url} is unavailable ({_short(exc)})")
                    raise BackendUnavailable(
                        f"Triton at {self.url} is unavailable after {self.retries + 1} attempts "
                        f"({_short(exc)}); retry with backoff") from exc
            pause = self.retry_backoff_s * 2**attempt * (0.5 + random.random())
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - time.perf_counter()))
            await asyncio.sleep(pause)
            attempt += 1

    async def close(self) -> None:
        self._loaded = False
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None


def _short(exc: Exception) -> str:
    text = getattr(exc, "message", lambda: str(exc))() or str(exc)
    return text.splitlines()[0][:200]
