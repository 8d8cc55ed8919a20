"""``python -m clients.predict IMAGE... --server HOST:PORT [--http] [--tasks a,b] [--out DIR]``

Sends each image to the gateway and writes, in ``--out`` (default ``predictions/``), one file per
task named after the image's stem and the task, ``STEM.TASK.png``, drawn as the task's kind
says (`parsimony.tasks`):

| picture | e.g. kind    | what                                                           |
|---------|--------------|----------------------------------------------------------------|
| classes | segmentation | palette colours, legend of class names with their pixel share  |
| scalar  | depth        | viridis over the map's range, colour bar labelled in its unit  |
| vector  | normal       | RGB = (v + 1) / 2                                              |
| scores  | attributes   | ``STEM.TASK.json`` instead: ``{attribute name: probability}``  |

(see `clients.visualize`), and prints, per image, the client's round-trip time and the latency of
each stage as the server reported it. PNG and JPEG files go to the server as they are; other
formats are decoded here and sent as raw pixels. The server never resizes: an image of another
size than the model's input is refused, unless ``--resize``, which resizes it here (bilinear, to
exactly the model's width and height, aspect ratio not kept) before sending. Exit status 1 when
any image failed (the others are still written), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from clients import visualize
from clients.cli import add_connection_args, choose_model, configure_logging, connection_options, load_image
from clients.client import Client
from clients.errors import ClientError
from clients.types import ModelInfo, Prediction
from parsimony.tasks import kind


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m clients.predict", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Predict every task of each image; write a picture (or JSON) per task and print the latencies.",
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="PNG, JPEG or any image PIL reads")
    add_connection_args(parser)
    parser.add_argument("--tasks", help="comma-separated tasks to return (default: every task)")
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="output folder (default %(default)s)")
    parser.add_argument("--resize", action="store_true",
                        help="resize images of another size to the model's input (bilinear, aspect ratio not kept)")
    parser.add_argument("--float16", action="store_true", help="ask for float16 float maps (depth, normals; half the bytes)")
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.images if not path.is_file()]
    if missing:  # before connecting: a typo should not read as a server problem
        parser.error(f"no such image file: {', '.join(missing)}")
    return args


def write_outputs(p: Prediction, info: ModelInfo, stem: str, out: Path) -> dict[str, str]:
    """One file per task, drawn as its kind's picture says; returns task -> a one-line description
    of what was written."""
    written = {}
    order = {t.name: i for i, t in enumerate(info.tasks)}  # the model's task order, not the wire map's
    for task, value in sorted(p.outputs.items(), key=lambda item: order.get(item[0], len(order))):
        picture = kind(p.kinds[task], task=task).picture(info.task(task), value)
        path = visualize.write(picture, out / f"{stem}.{task}", {"task": task, "kind": p.kinds[task]})
        written[task] = f"{path} ({picture.summary})"
    return written


def timing_line(p: Prediction, client_ms: float) -> str:
    stages = ", ".join(f"{k.removesuffix('_ms')} {v:.2f}" for k, v in p.timings.items() if k != "total_ms")
    return (f"client {client_ms:.2f} ms; server {p.timings['total_ms']:.2f} ms ({stages}); "
            f"batch {p.batch_size}")


def predict_one(client: Client, info: ModelInfo, path: Path, args: argparse.Namespace) -> None:
    image = load_image(path, info, args.resize)
    start = time.perf_counter()
    p = client.predict(info.name, image, tasks=args.tasks, output_dtype="float16" if args.float16 else "float32")
    client_ms = (time.perf_counter() - start) * 1e3
    written = write_outputs(p, info, path.stem, args.out)
    print(f"{path}: {p.model} v{p.version} over {client.protocol}: {timing_line(p, client_ms)}")
    for task, what in written.items():
        print(f"  {task}: {what}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    try:
        client = Client(args.server, **connection_options(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = 0
    with client:
        try:
            info = choose_model(client.list_models(), args.model)
        except ClientError as exc:
            print(f"error: {args.server}: {exc.code}: {exc}", file=sys.stderr)
            return 1
        args.out.mkdir(parents=True, exist_ok=True)
        for path in args.images:
            try:
                predict_one(client, info, path, args)
            except (ClientError, ValueError, OSError) as exc:
                failed += 1
                code = f"{exc.code}: " if isinstance(exc, ClientError) else ""
                print(f"error: {path}: {code}{exc}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
