"""Generate the Python protobuf/gRPC code (and mypy stubs) for protos/windflow/v1.

    python tools/gen_protos.py           # regenerate windflow/v1/*_pb2*.py(i)
    python tools/gen_protos.py --check   # exit 1 if the committed code is stale

This is the only way generated code is made; never edit it by hand.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("windflow") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_dir: Path) -> list[Path]:
    protos = sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    bin_dir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(
        p.relative_to(out_dir)
        for p in (out_dir / PACKAGE_DIR).iterdir()
        if p.name.endswith(GENERATED_SUFFIXES)
    )


def committed_files() -> list[Path]:
    return sorted(
        p.relative_to(ROOT)
        for p in (ROOT / PACKAGE_DIR).iterdir()
        if p.name.endswith(GENERATED_SUFFIXES)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        fresh = generate(out)
        if args.check:
            stale = [str(p) for p in fresh if not (ROOT / p).exists()]
            stale += [
                str(p)
                for p in fresh
                if (ROOT / p).exists() and not filecmp.cmp(out / p, ROOT / p, shallow=False)
            ]
            stale += [str(p) for p in committed_files() if p not in fresh]
            if stale:
                print("generated code is stale; run `make protos`:", *stale, sep="\n  ")
                return 1
            print(f"generated code is up to date ({len(fresh)} files)")
            return 0
        for p in committed_files():
            (ROOT / p).unlink()
        for p in fresh:
            shutil.copyfile(out / p, ROOT / p)
        print(f"wrote {len(fresh)} files under {PACKAGE_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
