"""``python -m clients.load --server HOST:PORT --concurrency C --duration S [--rate R] [--json [PATH]]``

Closed loop (C requests always in flight) or, with ``--rate R``, open loop (R arrivals per second,
Poisson or ``--arrivals uniform``, at most C outstanding: arrivals over the cap are dropped), bounded
by ``--duration`` seconds and/or ``--requests`` N (default: 10 s). Prints throughput, client-side
p50/p90/p99/max latency, the medians of the server's per-stage timings and the errors by code;
``--json`` prints the report as JSON instead, ``--json PATH`` writes it to PATH. The image is
random pixels of the model's input size (PNG), or ``--image PATH``. Requests are not retried unless
``--retries``, so every failure is counted. See `clients.loadgen` for the disciplines and the
report's fields. Exit status 0 when the run completed with at least one successful request, 1
otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from clients import loadgen
from clients.cli import add_connection_args, choose_model, configure_logging, connection_options, load_image
from clients.client import Client
from clients.errors import ClientError

log = logging.getLogger("clients.load")
DEFAULT_DURATION = 10.0  # seconds, when neither --duration nor --requests bounds the run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m clients.load", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description=__doc__.split("\n\n")[1])
    add_connection_args(parser)
    parser.set_defaults(retries=0)
    load = parser.add_argument_group("load")
    load.add_argument("--concurrency", "-c", type=int, default=8, help="workers (closed loop) or cap on outstanding "
                                                                         "requests (open loop); default %(default)s")
    load.add_argument("--duration", "-d", type=float, help=f"seconds of issuing requests (default {DEFAULT_DURATION:g} without --requests)")
    load.add_argument("--requests", "-n", type=int, help="requests to issue (arrivals, in the open loop)")
    load.add_argument("--rate", "-r", type=float, help="open loop: arrivals per second")
    load.add_argument("--arrivals", choices=loadgen.ARRIVALS, default="poisson", help="open-loop arrival process")
    load.add_argument("--image", type=Path, help="image to send (default: random pixels of the model's input size)")
    load.add_argument("--resize", action="store_true", help="resize --image to the model's input (bilinear)")
    load.add_argument("--tasks", help="comma-separated tasks to ask for (default: every task)")
    load.add_argument("--float16", action="store_true", help="ask for float16 outputs")
    load.add_argument("--warmup", type=int, default=0, help="unmeasured requests first (default %(default)s)")
    load.add_argument("--json", nargs="?", const="-", metavar="PATH",
                      help="print the report as JSON instead of the table (with PATH: write it there)")
    args = parser.parse_args(argv)
    if args.duration is None and args.requests is None:
        args.duration = DEFAULT_DURATION
    try:  # before connecting: a bad setting should not read as a server problem
        loadgen.check_bounds(args.concurrency, args.duration, args.requests, args.rate, args.arrivals)
    except ValueError as exc:
        parser.error(str(exc))
    if args.image is not None and not args.image.is_file():
        parser.error(f"no such image file: {args.image}")
    return args


def format_report(r: dict) -> str:
    def ms(value):
        return "-" if value is None else f"{value:.2f}"

    asked = (f"closed loop, concurrency {r['concurrency']}" if r["mode"] == "closed" else
             f"open loop, {r['rate_rps']:g} req/s {r['arrivals']}, at most {r['concurrency']} outstanding")
    lat = r["latency_ms"]
    stages = ", ".join(f"{k.removesuffix('_ms')} {v:.2f}" for k, v in r["server_ms"].items() if k.endswith("_ms"))
    lines = [
        f"{asked}; {r['protocol']} {r['server']}, model {r['model']} v{r['model_version']}",
        f"elapsed {r['elapsed_s']:.2f} s: sent {r['sent']}, ok {r['ok']}, errors {r['error_count']}, "
        f"dropped {r['dropped']}, late {r['late']}",
        f"throughput {r['throughput_rps']:.1f} req/s",
        f"latency ms: p50 {ms(lat['p50'])}, p90 {ms(lat['p90'])}, p99 {ms(lat['p99'])}, max {ms(lat['max'])}",
        f"server ms (median): {stages or '-'}; mean batch {r['server_ms'].get('batch_size_mean', 0):.2f}",
    ]
    if r["errors"]:
        lines.append("errors: " + ", ".join(f"{code} {n}" for code, n in r["errors"].items()))
    return "\n".join(lines)


def progress_printer(args: argparse.Namespace):
    """A tqdm bar on a terminal, a log line every 5 s otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        by_time = args.duration is not None
        bar = tqdm(total=args.duration if by_time else args.requests, unit="s" if by_time else "req",
                   bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} {unit}{postfix}")

        def show(s: dict) -> None:
            bar.n = min(bar.total, s["elapsed_s"] if by_time else s["sent"] + s["dropped"])
            bar.set_postfix_str(f"ok {s['ok']} errors {s['error_count']}")

        return show, 1.0, bar.close
    return (lambda s: log.info("%.0f s: sent %d, ok %d, errors %d", s["elapsed_s"], s["sent"], s["ok"],
                               s["error_count"])), 5.0, lambda: None


def pick_image(args: argparse.Namespace, options: dict):
    """The image to send, read once (the model's size from the server, for --image)."""
    if args.image is None:
        return None
    with Client(args.server, **options) as client:
        return load_image(args.image, choose_model(client.list_models(), args.model), args.resize)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    try:
        options = connection_options(args)
        image = pick_image(args, options)
        show, interval, close = progress_printer(args)
        try:
            report = asyncio.run(loadgen.load(
                args.server, model=args.model, image=image, warmup=args.warmup, protocol=options["protocol"],
                tls=options["tls"], retry=options["retry"], concurrency=args.concurrency, duration=args.duration,
                requests=args.requests, rate=args.rate, arrivals=args.arrivals, tasks=args.tasks,
                output_dtype="float16" if args.float16 else "float32", timeout=args.timeout,
                progress=show, progress_interval=interval))
        finally:
            close()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ClientError, OSError) as exc:
        print(f"error: {args.server}: {getattr(exc, 'code', type(exc).__name__)}: {exc}", file=sys.stderr)
        return 1
    if args.json is not None and args.json != "-":
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2) if args.json == "-" else format_report(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
