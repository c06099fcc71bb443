"""Regenerate the Python modules of every `.proto` in this folder (run from anywhere).

    python protos/generate.py            # write protos/*_pb2*.py(i)
    python protos/generate.py --out DIR  # write into DIR/protos/ instead (used by the drift test)

Imports in the generated code are package-qualified (`from rdu.protos import interconnect_pb2`):
protoc runs on a copy of the `.proto` files staged at `rdu/protos/` in a scratch folder, the
package path they have once installed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generate(out_root: Path) -> list[Path]:
    from grpc_tools import protoc

    out = out_root / "protos"
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted((ROOT / "protos").glob("*.proto"))
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / "rdu" / "protos"
        staged.mkdir(parents=True)
        built = Path(scratch) / "out"
        built.mkdir()
        for proto in protos:
            shutil.copyfile(proto, staged / proto.name)
            code = protoc.main(["grpc_tools.protoc", f"-I{scratch}", f"--python_out={built}", f"--pyi_out={built}",
                                f"--grpc_python_out={built}", str(staged / proto.name)])
            if code != 0:
                raise SystemExit(f"protoc failed on {proto.relative_to(ROOT)}")
        for generated in (built / "rdu" / "protos").iterdir():
            shutil.copyfile(generated, out / generated.name)
    return sorted(p for p in out.iterdir() if "_pb2" in p.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write protos/ into (default: the repository)")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
