"""Regenerate the committed gRPC/protobuf modules from ``parsimony/v1/*.proto``.

    python -m serving.proto.generate        # or: make proto

protoc names imports after the proto path (``from parsimony.v1 import gateway_pb2``), which would
need ``serving/proto`` on ``sys.path``; the generated imports are rewritten to the package path
instead. The descriptors keep the name ``parsimony/v1/gateway.proto``, which is what server
reflection shows and what clients compiling the .proto themselves expect.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PACKAGE = "serving.proto"


def generate() -> list[Path]:
    from grpc_tools import protoc  # dev dependency (grpcio-tools): only needed to regenerate

    protos = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("parsimony/*/*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    out = str(ROOT)
    code = protoc.main(["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
                        f"--grpc_python_out={out}", *protos])
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code} on {protos}")
    written = sorted(ROOT.glob("parsimony/*/*_pb2*.py*"))
    for path in written:
        text = re.sub(r"^from parsimony\.", f"from {PACKAGE}.parsimony.", path.read_text(), flags=re.M)
        path.write_text(text)
    return written


def main() -> int:
    for path in generate():
        print(path.relative_to(ROOT.parents[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
