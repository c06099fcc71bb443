"""Installing the project adds one top-level import name, `rdu` (besides the `rdu` console
script), so it never shadows, or is shadowed by, PyPI packages called `node` or `scheduler`; and
the installed package carries its data (presets, model configs, the shipped trace, the .proto)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_an_install_adds_one_top_level_name_and_its_data(tmp_path):
    wheels, target, source = tmp_path / "wheels", tmp_path / "site", tmp_path / "source"
    # built from a copy: setuptools writes build/ and *.egg-info beside the sources it builds
    outputs = {".venv", ".git", "build", "runs", "sweeps", "reproduce", ".pytest_cache", ".hypothesis", "tests"}
    shutil.copytree(ROOT, source, ignore=lambda folder, names: [
        n for n in names if n == "__pycache__" or n.endswith(".egg-info") or (Path(folder) == ROOT and n in outputs)])
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(source)], check=True, capture_output=True)
    wheel, = wheels.glob("rdu_emulator-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    top = {p.name for p in target.iterdir()}
    assert {name for name in top if not name.endswith(".dist-info")} == {"rdu", "bin"}, top
    assert (target / "bin" / "rdu").is_file()
    for data in ("node/cluster/presets/sn40l-node.yaml", "node/cluster/presets/calibration.json",
                 "socket_actor/models/llama-2-7b.json", "scheduler/data/azure_llm_code_2023.csv",
                 "protos/interconnect.proto"):
        assert (target / "rdu" / data).is_file(), data
    code = "import rdu.node.cluster.platform as p; print(p.__file__); print(p.platform_presets())"
    where, listed = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                   env={"PYTHONPATH": str(target)}, cwd=tmp_path).stdout.splitlines()
    assert where.startswith(str(target)) and "sn40l-node" in listed
