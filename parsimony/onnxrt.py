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

    options = ort.SessionOptions()
    for name, value in session_settings(threads, spinning).items():
        if "." in name:
            options.add_session_config_entry(name, value)
        else:
            setattr(options, name, int(value))
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile)
    return options


def session_settings(threads: int = 0, spinning: str = "always") -> dict[str, str]:
    """What `session_options` sets, as ``{name: value}`` strings: ``SessionOptions`` attributes (integers)
    and session config entries (names with a dot). Triton's python backend, which cannot import this
    package, gets them as its config's parameters and applies them the same way."""
    if spinning not in SPINNING:
        raise ValueError(f"unknown spinning mode {spinning!r}; choose one of {sorted(SPINNING)}")
    allow, stop = SPINNING[spinning]
    return {"intra_op_num_threads": str(int(threads)), "inter_op_num_threads": "1", "log_severity_level": "3",
            "session.intra_op.allow_spinning": allow, "session.force_spinning_stop": stop}


def session(model: str | Path | bytes, *, threads: int = 0, spinning: str = "always",
            providers: Sequence[str] = CPU, profile: str | Path | None = None):
    """An ``onnxruntime.InferenceSession`` over a file or serialized graph, configured as above."""
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, session_options(threads, spinning, profile), providers=list(providers))
