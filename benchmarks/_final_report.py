"""The markdown report of `benchmarks.final_graph`: one table per part, before (the raw graph) and
after (the final graph) side by side, each target marked met or not."""

from __future__ import annotations

GRAPH_NAMES = {"raw": "before (raw graph)", "final": "after (final graph)"}


def _mark(met: bool) -> str:
    return "✓" if met else "✗"


def _bytes(before: int, after: int) -> str:
    return f"{before:,} → {after:,}" + (f" ({after / before:.3f}×)" if before and before != after else "")


def _size(r: dict) -> str:
    return f"{r['image_size'][0]}x{r['image_size'][1]}"


def bytes_table(results: list[dict]) -> list[str]:
    if not any("bytes" in r for r in results):
        return []
    lines = ["Bytes per response on each hop at batch 1 (exact; before → after): the gateway's gRPC request to "
             "Triton (the image as the graph takes it), Triton's gRPC response for the outputs the gateway asks for "
             "(its tensors alone, and the whole message), and the gateway's answer to its client (gRPC "
             "`PredictResponse` and HTTP JSON body):", "",
             "| model | size | outputs | probabilities | gateway → Triton | Triton → gateway: tensors | "
             "Triton → gateway: message | gateway → client: gRPC | gateway → client: JSON |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for row in r.get("bytes", ()):
            b, a = row["raw"], row["final"]
            lines.append(
                f"| {r['model']} | {_size(r)} | {row['output_dtype']} | {'yes' if row['probabilities'] else 'no'} | "
                f"{_bytes(b['to_triton'], a['to_triton'])} | "
                f"{_bytes(b['from_triton']['tensors'], a['from_triton']['tensors'])} | "
                f"{_bytes(b['from_triton']['message'], a['from_triton']['message'])} | "
                f"{_bytes(b['to_client']['grpc'], a['to_client']['grpc'])} | "
                f"{_bytes(b['to_client']['json'], a['to_client']['json'])} |")
    return lines


def ort_table(results: list[dict], args) -> list[str]:
    if not any("ort" in r for r in results):
        return []
    lines = ["ONNX Runtime in process (median ms per batch, uint8 images in, every task's answer out, default "
             f"options): the final graph against the raw graph plus the Python it replaces (uint8 → float per "
             f"image, each task's post-processing); {args.threads} intra-op thread(s):", "",
             "| model | size | batch | raw graph + Python (ms) | final graph (ms) | ratio (≤ 1) | the Python alone (ms) | "
             "final graph, whole session (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for row in r.get("ort", ()):
            lines.append(f"| {r['model']} | {_size(r)} | {row['batch']} | {row['raw_ms']:.2f} | {row['final_ms']:.2f} | "
                         f"{row['ratio']:.3f} {_mark(row['met'])} | {row['python_ms']:.2f} | "
                         f"{row['final_unpruned_ms']:.2f} |")
    lines += ["", "The final graph runs in a session pruned to the outputs asked for (`parsimony.onnxrt.session(..., "
              "outputs=...)`); the last column runs the whole graph's session, asked for the same outputs: ONNX Runtime "
              "runs every node whatever a run asks for, so that session also computes the probabilities, float16 "
              "copies and logits."]
    return lines


def cpu_table(results: list[dict], args) -> list[str]:
    measured = [r for r in results if "cpu" in r]
    if not measured:
        return []
    lines = [f"The gateway's own CPU per request (embedded ONNX Runtime, 1 intra-op thread; {args.rounds} alternating "
             f"windows of {args.cpu_requests} sequential gRPC calls per graph, raw uint8 tensor, every task): process "
             "CPU time minus the forward passes as the gateway times them:", "",
             "| model | graph | requests | process CPU (ms) | forward pass (ms) | **own CPU (ms)** | own CPU beyond a "
             "no-op gRPC server's (ms) | forward pass CPU in process (ms) / own CPU by it (ms) | server time around "
             "the forward pass, median (ms) | client p50 (ms) | response bytes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in measured:
        c = r["cpu"]
        for g, label in GRAPH_NAMES.items():
            x = c[g]
            lines.append(f"| {r['model']} | {label} | {x['requests']} | {x['cpu_ms']:.3f} | {x['forward_ms']:.3f} | "
                         f"**{x['own_cpu_ms']:.3f}** | {x['beyond_noop_ms']:.3f} | {x['forward_cpu_ms']:.3f} / "
                         f"{x['own_cpu_by_forward_cpu_ms']:.3f} | {x['around_forward_ms']:.3f} | "
                         f"{x['client_p50_ms']:.2f} | {x['response_bytes']:,} |")
        lines.append(f"| {r['model']} | **after ÷ before** | | | | **{c['ratio']:.2f}× {_mark(c['met'])}** (≤ 0.5) | "
                     f"{c['ratio_beyond_noop']:.2f}× | {c['ratio_by_forward_cpu']:.2f}× | | | |")
    lines += ["", "A no-op grpc.aio server answering the same response bytes, called the same way, takes " + ", ".join(
        f"{r['cpu']['noop_cpu_ms']:.3f} ms ({r['model']})" for r in measured) +
        " of CPU per call: the part of the own CPU that any Python gRPC server pays, whatever the graph."]
    return lines


def gateway_table(results: list[dict], args) -> list[str]:
    measured = [r for r in results if "gateway" in r]
    if not measured:
        return []
    lines = [f"The gateway against in-process ONNX Runtime running the same graph, p50 at batch 1 ({args.threads} "
             f"intra-op threads on both sides, ORT spinning `{args.ort_spinning}`; before: ORT gets the float32 input "
             "and computes every output; after: uint8 input, the outputs the gateway asks for):", "",
             "| model | size | graph | ORT p50 (ms) | gateway p50 (ms) | ratio | server total / inference (ms) | "
             "response bytes |", "|---|---|---|---|---|---|---|---|"]
    for r in measured:
        for g, label in GRAPH_NAMES.items():
            x = r["gateway"][g]
            target = f" {_mark(r['gateway']['met'])} (≤ 1.05)" if g == "final" and r["model"] != "demo" else ""
            lines.append(f"| {r['model']} | {_size(r)} | {label} | {x['ort_p50_ms']:.2f} | {x['gateway_p50_ms']:.2f} | "
                         f"{x['ratio']:.3f}{target} | {x['server_ms']['total_ms']:.2f} / "
                         f"{x['server_ms']['inference_ms']:.2f} | {x['response_bytes']:,} |")
    return lines


def report(results: list[dict], args, env: dict) -> str:
    quick = "; **QUICK: tiny sizes, a smoke test, not the acceptance measurement**" if args.quick else ""
    load = "/".join(f"{x:.2f}" for x in env["load_average"])
    head = [f"`{env['command']}`: onnxruntime {env['onnxruntime']} (CPU), {env['cores']} cores ({env['cpu']}), "
            f"Python {env['python']}; gateway, client and in-process ORT on the same machine; load average "
            f"{load} before the run{quick}. Models: " + "; ".join(f"{r['model']}: {r['case']}" for r in results) +
            ", untrained, half the encoder's channels removed; each exported twice from the same compact model, "
            "raw (`--raw-outputs`, before) and final (after). Timed series alternate in "
            f"{args.rounds} rounds; medians over all rounds."]
    sections = [head, bytes_table(results), ort_table(results, args), cpu_table(results, args),
                gateway_table(results, args)]
    return "\n\n".join("\n".join(s) for s in sections if s) + "\n"
