"""Regenerate the Python modules of every `.proto` in this folder (run from anywhere).

    python protos/generate.py            # write protos/*_pb2*.py(i)
    python protos/generate.py --out DIR  # write into DIR/protos/ instead (used by the drift test)

Imports in the generated code are package-qualified (`from protos import interconnect_pb2`)
because protoc runs with the repository root as its include path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generate(out_root: Path) -> list[Path]:
    from grpc_tools import protoc

    (out_root / "protos").mkdir(parents=True, exist_ok=True)
    protos = sorted((ROOT / "protos").glob("*.proto"))
    for proto in protos:
        rel = proto.relative_to(ROOT)
        code = protoc.main(["grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out_root}", f"--pyi_out={out_root}",
                            f"--grpc_python_out={out_root}", str(proto)])
        if code != 0:
            raise SystemExit(f"protoc failed on {rel}")
    return sorted(p for p in (out_root / "protos").iterdir() if "_pb2" in p.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write protos/ into (default: the repository)")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
