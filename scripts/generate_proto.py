"""Regenerate the Python code for proto/secrets_manager/v1/*.proto into src/secrets_manager/v1/.

    python scripts/generate_proto.py            # write the generated files
    python scripts/generate_proto.py --check    # exit 1 if the committed files are out of date

Needs grpcio-tools (in the `dev` extra). tests/test_proto.py runs the --check mode.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_FILES = sorted(PROTO_ROOT.glob("secrets_manager/v1/*.proto"))
OUTPUT_PACKAGE = Path("secrets_manager") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (the one grpcio-tools ships) into `out_dir`; return the generated files."""
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p) for p in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for p in (out_dir / OUTPUT_PACKAGE).iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    target = ROOT / "src" / OUTPUT_PACKAGE
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        stale = [
            p.name
            for p in generated
            if not (target / p.name).exists() or not filecmp.cmp(p, target / p.name, shallow=False)
        ]
        if args.check:
            if stale:
                print(f"out of date: {', '.join(stale)}; run python scripts/generate_proto.py")
                return 1
            print("generated code is up to date")
            return 0
        for p in generated:
            (target / p.name).write_bytes(p.read_bytes())
        print(f"wrote {len(generated)} files to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
