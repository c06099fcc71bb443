"""The generated modules must be what `protos/generate.py` makes of the `.proto` files."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_matches_proto(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    generated = sorted(p.name for p in (tmp_path / "protos").iterdir())
    committed = sorted(p.name for p in (ROOT / "protos").iterdir() if "_pb2" in p.name)
    assert generated == committed, "regenerate with: python protos/generate.py"
    for name in generated:
        assert (tmp_path / "protos" / name).read_bytes() == (ROOT / "protos" / name).read_bytes(), (
            f"protos/{name} drifted from its .proto; regenerate with: python protos/generate.py")
