"""Regenerates the Python modules of the contract: proto/optserve/v1/*.proto -> client/optserve/v1/.

    python proto/generate.py            # write into client/
    python proto/generate.py --out DIR  # write elsewhere (tests compare DIR with client/)

The generated files are committed so that `pip install optserve` needs no protoc; a test fails when
they are stale against the .proto.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTOS = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "optserve" / "v1").glob("*.proto"))


def generate(out_dir: pathlib.Path) -> None:
    import grpc_tools
    from grpc_tools import protoc  # test/dev dependency only

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "client")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    sys.exit(main())
