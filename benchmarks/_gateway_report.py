"""The markdown report of `benchmarks.gateway`: the latency and throughput tables against their
targets, and writing them into their own marked section of a file such as docs/BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path

MARK_BEGIN, MARK_END = "<!-- benchmarks.gateway:begin -->", "<!-- benchmarks.gateway:end -->"


def _spin(mode: str) -> str:
    return f" ({mode})"


def _mark(met: bool) -> str:
    return "✓" if met else "✗"


def report(results: list[dict], args, env: dict) -> str:
    quick = "; **QUICK: tiny sizes, a smoke test, not the acceptance measurement**" if args.quick else ""
    lines = [
        f"onnxruntime {env['onnxruntime']} (CPU), {env['threads']} intra-op threads on both sides, {env['cores']} "
        f"cores ({env['cpu']}), Python {env['python']}; gateway, client and ORT on the same machine{quick}. Graph: "
        + ("the raw graph (`--raw-outputs`; the gateway converts the pixels and post-processes every task)."
           if getattr(args, "raw_outputs", False) else "the final graph (the answers computed in the graph; in-process "
           "ORT runs it pruned to the outputs the gateway asks for)."), "",
        "Latency at batch 1 (sequential calls; the gateway gets a raw uint8 tensor, so no decode):", "",
        "| model | size | ORT p50 (ms) | gateway p50 (ms) | ratio (≤ 1.05) | gRPC floor p50 (ms) | gateway − floor "
        "(ms) | ratio without transport | server total / inference (ms) | decode PNG / JPEG in process (ms) "
        "| PNG request p50 / server decode (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        o, g, q = r["ort"], r["gateway"], r["ratios"]
        t, p = g["tensor"], g["png"]
        lines.append(
            f"| {r['model']} | {r['image_size'][0]}x{r['image_size'][1]} | {o['p50_ms']:.2f}{_spin(o['p50_spinning'])} | "
            f"{t['p50_ms']:.2f} | "
            f"{q['p50']:.3f} {_mark(r['p50_met'])} | {g['floor']['p50_ms']:.2f} | {t['p50_ms'] - g['floor']['p50_ms']:.2f} "
            f"| {q['p50_without_transport']:.3f} | {t['server_ms']['total_ms']:.2f} / {t['server_ms']['inference_ms']:.2f} "
            f"| {o['decode_ms']['PNG']:.2f} / {o['decode_ms']['JPEG']:.2f} | {p['p50_ms']:.2f} / "
            f"{p['server_ms']['decode_ms']:.2f} |")
    lines += ["", f"Throughput (images/s) at concurrency {args.concurrency}, dynamic batching (no queue delay) "
              f"against ONNX Runtime's best batch:", "",
              "| model | ORT best (batch) | gateway (max batch; mean batch) | ratio (≥ 0.9) | gRPC floor (requests/s) |",
              "|---|---|---|---|---|"]
    for r in results:
        o, g = r["ort"], r["gateway"]
        lines.append(f"| {r['model']} | {o['best_throughput']:.1f} (b{o['best_batch']}){_spin(o['throughput_spinning'])} | "
                     f"{g['throughput']['images_per_s']:.1f} ({g['max_batch']}; {g['throughput']['mean_batch']:.1f}) | "
                     f"{r['ratios']['throughput']:.3f} {_mark(r['throughput_met'])} | "
                     f"{g['floor']['requests_per_s']:.0f} |")
    bounded = [r for r in results if r.get("bounds")]
    if bounded:
        lines += ["", "What any Python gRPC front end can reach here (`benchmarks/_gateway_bounds.py`): h2load, a C client, "
                  "against a no-op grpc.aio server answering with the gateway's response bytes, and against the gateway:",
                  "", "| model | no-op round trip p50 (ms) | no-op server CPU per call (ms) | best possible p50 ratio "
                  "| best possible throughput ratio | gateway, C client: images/s (ratio) | gateway process CPU per call, forward pass included (ms) |",
                  "|---|---|---|---|---|---|---|"]
        for r in bounded:
            b, noop, gw = r["bounds"], r["gateway"]["floor"]["c_client"], r["gateway"]["throughput_c_client"]
            lines.append(
                f"| {r['model']} | {noop['1']['p50_ms']:.2f} | {noop[str(args.concurrency)]['server_cpu_ms_per_call']:.2f} "
                f"| ≥ {b['p50_ratio_floor']:.3f} {_mark(b['p50_ratio_floor'] <= 1.05)} "
                f"| ≤ {b['throughput_ratio_ceiling']:.3f} {_mark(b['throughput_ratio_ceiling'] >= 0.9)} "
                f"| {gw['requests_per_s']:.1f} ({r['ratios']['throughput_c_client']:.3f}) "
                f"| {gw['server_cpu_ms_per_call']:.2f} |")
    lines += ["", "ORT's threads spin as the gateway's do for the latency (run: within a forward pass only, the "
              "gateway's default; always; never). ORT's best throughput: the best batch size and "
              "spinning mode of a sweep, re-measured in alternating rounds with the gateway's throughput. "
              "The gRPC floor is a no-op grpc.aio server answering with "
              "the same response bytes: the transport and Python gRPC cost on both ends, which any Python gateway "
              "pays on top of the forward pass."]
    return "\n".join(lines) + "\n"


def update_markdown(path: Path, section: str, *, name: str = "gateway",
                    title: str = "Prediction gateway (`python -m benchmarks.gateway`)") -> None:
    """Replace benchmark ``name``'s section of ``path`` (between its markers, added at the end when
    missing) with ``title`` and ``section``, keeping everything else."""
    begin, end = f"<!-- benchmarks.{name}:begin -->", f"<!-- benchmarks.{name}:end -->"  # MARK_BEGIN/END for gateway
    block = f"{begin}\n## {title}\n\n{section}{end}\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        text = before + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
