"""Regenerate ``flawline_pb2.py`` and ``flawline_pb2_grpc.py`` from serve/flawline.proto.

    python -m flawline.serving.grpc_api.generate            # rewrite them beside this file
    python -m flawline.serving.grpc_api.generate --check    # exit 1 if they differ from the .proto

Needs grpcio-tools (the version pinned in .ci/constraints.txt: its protoc's output is what is
committed). protoc is given the .proto at this package's path (flawline/serving/grpc_api/), so the
modules import each other by their package path and the message classes' module is
``flawline.serving.grpc_api.flawline_pb2``: Serve pickles requests between its gRPC proxy and the
replicas, and a class of a top-level ``flawline_pb2`` module would not unpickle there.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE.parents[3] / "serve" / "flawline.proto"
MODULES = ("flawline_pb2.py", "flawline_pb2_grpc.py")


def generate(proto: Path = PROTO) -> dict[str, str]:
    """The generated modules' text, by file name (nothing is written)."""
    import grpc_tools
    from grpc_tools import protoc

    version = getattr(grpc_tools, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("grpcio-tools")
    package = Path(*__package__.split("."))  # flawline/serving/grpc_api
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "in", Path(tmp) / "out"
        (root / package).mkdir(parents=True)
        (root / package / "flawline.proto").write_bytes(proto.read_bytes())
        out.mkdir()
        code = protoc.main(["grpc_tools.protoc", f"-I{root}", f"--python_out={out}", f"--grpc_python_out={out}",
                            str(root / package / "flawline.proto")])
        if code != 0:
            raise RuntimeError(f"protoc failed on {proto} (exit {code})")
        texts = {name: (out / package / name).read_text() for name in MODULES}
    header = (f"# Generated from serve/flawline.proto by grpcio-tools {version}; do not edit.\n"
              "# Regenerate: python -m flawline.serving.grpc_api.generate\n")
    return {name: header + text for name, text in texts.items()}


def stale(folder: Path = HERE, proto: Path = PROTO) -> list[str]:
    """The committed modules in ``folder`` that differ from what ``proto`` generates now."""
    return [name for name, text in generate(proto).items()
            if not (folder / name).is_file() or (folder / name).read_text() != text]


def main(argv: list[str]) -> int:
    if "--check" in argv:
        names = stale()
        for name in names:
            print(f"{HERE / name}: differs from {PROTO}; run python -m flawline.serving.grpc_api.generate",
                  file=sys.stderr)
        return 1 if names else 0
    for name, text in generate().items():
        (HERE / name).write_text(text)
        print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
