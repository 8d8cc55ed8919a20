"""ONNX Runtime sessions configured in one place: the embedded backend, Triton's Python backend,
the export check and the benchmarks all build theirs here, so they measure the same thing.
onnxruntime is imported only when a session is made (it is in the serve and train extras, not in
the contract's own dependencies)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# intra-op thread pool behaviour: (session.intra_op.allow_spinning, session.force_spinning_stop)
SPINNING: dict[str, tuple[str, str]] = {
    "run": ("1", "1"),     # spin while a run is in flight, stop between runs
    "always": ("1", "0"),  # spin between runs too: lowest latency, burns a core while idle
    "never": ("0", "0"),   # sleep between ops: no idle CPU, a little latency
}
CPU = ("CPUExecutionProvider",)


def session_options(threads: int = 0, spinning: str = "always", profile: str | Path | None = None):
    """``threads`` intra-op threads (0: one per physical core), one inter-op thread, ``spinning`` a
    key of `SPINNING`, warnings and errors only in the log; with ``profile`` (a file name prefix)
    ONNX Runtime's profiler records every run (``session.end_profiling()`` returns the trace's path)."""
    import onnxruntime as ort

    if spinning not in SPINNING:
        raise ValueError(f"unknown spinning mode {spinning!r}; choose one of {sorted(SPINNING)}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    allow, stop = SPINNING[spinning]
    options.add_session_config_entry("session.intra_op.allow_spinning", allow)
    options.add_session_config_entry("session.force_spinning_stop", stop)
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile)
    return options


def session(model: str | Path | bytes, *, threads: int = 0, spinning: str = "always",
            providers: Sequence[str] = CPU, profile: str | Path | None = None):
    """An ``onnxruntime.InferenceSession`` over a file or serialized graph, configured as above."""
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, session_options(threads, spinning, profile), providers=list(providers))
