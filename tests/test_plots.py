"""`rdu plot`: the PNGs of a finished run and of a crashed one."""

import pytest

from interconnect.spec_fields import UserError
from node.cli import main
from node.plots import PLOT_FILES, write_plots
from node.run import execute_run
from node.run_config import resolve_run_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    config = resolve_run_config(None, {"backend": "inline", "nodes": 2, "tp": 4, "scheduler": {"policy": "prefetch"},
                                       "out": str(tmp_path_factory.mktemp("plots") / "r"),
                                       "workload": {"limit": 200}})
    return execute_run(config).out_dir


def assert_pngs(paths):
    assert sorted(p.name for p in paths) == sorted(PLOT_FILES)
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 20_000, path


def test_rdu_plot_writes_every_png_into_run_dir_plots(run_dir, capsys):
    assert main(["plot", str(run_dir)]) == 0
    out = capsys.readouterr().out
    paths = [run_dir / "plots" / name for name in PLOT_FILES]
    assert all(str(p) in out for p in paths)
    assert_pngs(paths)


def test_a_crashed_run_is_plotted_from_its_events(run_dir, tmp_path):
    crashed = tmp_path / ".r.partial-99"
    crashed.mkdir()
    data = (run_dir / "events.msgpack").read_bytes()
    (crashed / "events.msgpack").write_bytes(data[: len(data) * 2 // 3])  # no requests.csv, truncated tail
    assert_pngs(write_plots(crashed, tmp_path / "elsewhere"))
    assert not (crashed / "plots").exists()


def test_missing_run_directory(tmp_path, capsys):
    with pytest.raises(UserError, match="no such run directory"):
        write_plots(tmp_path / "missing")
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
