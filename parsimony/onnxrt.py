"""ONNX Runtime sessions configured in one place: the embedded backend, Triton's Python backend,
the export check and the benchmarks all build theirs here, so they measure the same thing.
onnxruntime is imported only when a session is made (it is in the serve and train extras, not in
the contract's own dependencies).

ONNX Runtime runs every node of a graph on every run, whatever outputs the run asks for
(``RunOptions.only_execute_path_to_fetches`` works only in its training builds), so a final graph's
outputs nobody asked for (probability maps, float16 copies, logits) would cost their compute on
every call. A session over `prune`'s copy of the graph (``session(..., outputs=[...])``) runs only
the nodes those outputs need."""

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
            providers: Sequence[str] = CPU, profile: str | Path | None = None, outputs: Sequence[str] | None = None):
    """An ``onnxruntime.InferenceSession`` over a file or serialized graph, configured as above;
    with ``outputs``, over the graph pruned to them (`prune`)."""
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    if outputs is not None:
        source = prune(model, outputs)
    return ort.InferenceSession(source, session_options(threads, spinning, profile), providers=list(providers))


def prune(model: str | Path | bytes, outputs: Sequence[str]) -> bytes:
    """The serialized graph with only the outputs named in ``outputs`` and the nodes and weights
    they need (the inputs all stay; needs the onnx package: the serve and train extras). A name
    that is not an output of the graph is a ``ValueError`` naming the ones it has."""
    import onnx

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
    graph = proto.graph
    unknown = [n for n in outputs if n not in {o.name for o in graph.output}]
    if unknown or not outputs:
        raise ValueError(f"cannot prune the graph to outputs {list(outputs)}: name at least one of its outputs "
                         f"{[o.name for o in graph.output]}")
    wanted, kept = set(outputs), []
    needed = set(wanted)
    for node in reversed(graph.node):  # nodes are in topological order: walk back from the outputs
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(_names_read(node))
    for field, values, keep in (("output", graph.output, wanted), ("node", kept[::-1], None),
                                ("initializer", graph.initializer, needed), ("value_info", graph.value_info, needed)):
        chosen = [v for v in values if keep is None or v.name in keep]
        graph.ClearField(field)
        getattr(graph, field).extend(chosen)
    return proto.SerializeToString()


def _names_read(node) -> set[str]:
    """The value names a node reads: its inputs and, for control flow, every name its subgraphs read."""
    import onnx

    names = {i for i in node.input if i}
    for attr in node.attribute:
        subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in subgraphs:
            for inner in sub.node:
                names |= _names_read(inner)
    return names
