import pytest

from rdu.base import UserError
from rdu.node.cluster.platform import load_platform, platform_presets
from rdu.yaml_io import leaf_paths


def test_presets():
    assert {"sn40l-node", "sn40l-16", "dgx-a100", "dgx-h100"} <= set(platform_presets())
    sn = load_platform("sn40l-node").spec
    assert sn.sockets_per_node == 8 and sn.socket.hbm.capacity_bytes == 64 * 2**30
    assert sn.capacity_tier_bytes == 12e12
    assert load_platform("sn40l-16").spec.sockets_per_node == 16
    dgx = load_platform("dgx-h100").spec
    assert dgx.host_dram is not None and dgx.socket.ddr is None and dgx.capacity_tier_name == "host_dram"
    assert dgx.links.host_shared.bandwidth_bytes_per_s == 64e9


@pytest.mark.parametrize("name", ["sn40l-node", "sn40l-16", "sn40l-node-looped", "dgx-a100", "dgx-h100"])
def test_every_value_cites_a_source(name):
    platform = load_platform(name)
    for path in leaf_paths(platform.values):
        if path.split(".")[-1] in ("name", "description", "kind"):
            continue
        source = platform.sources.get(path, "")
        assert any(tag in source for tag in ("[S]", "[I]", "assumption", "fitted")), f"{name}: {path}: {source!r}"


@pytest.mark.parametrize("name", ["sn40l-node", "dgx-a100", "dgx-h100"])
def test_numeric_names_carry_units(name):
    allowed = ("_bytes", "_per_s", "_ns", "_fraction", "sockets_per_node", "max_restarts")  # the last two: counts
    for path in leaf_paths(load_platform(name).values):
        leaf = path.split(".")[-1]
        value = load_platform(name).values
        for part in path.split("."):
            value = value[part]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert leaf.endswith(allowed), path


def test_user_yaml_overrides_a_preset(tmp_path):
    path = tmp_path / "fast-hbm.yaml"
    path.write_text("base: sn40l-node\nname: fast-hbm\nsocket:\n  hbm:\n    bandwidth_bytes_per_s: 3.6e12\n")
    platform = load_platform(str(path))
    assert platform.spec.socket.hbm.bandwidth_bytes_per_s == 3.6e12
    assert platform.spec.socket.hbm.capacity_bytes == 64 * 2**30  # inherited
    assert platform.sources["socket.hbm.bandwidth_bytes_per_s"] == f"set in {path}"


def test_override_with_set():
    platform = load_platform("sn40l-node", {"links.p2p.latency_ns": 100})
    assert platform.spec.links.p2p.latency_ns == 100
    with pytest.raises(UserError, match="links.p2p.nope: no such platform field"):
        load_platform("sn40l-node", {"links.p2p.nope": 1})


@pytest.mark.parametrize("text, message", [
    ("base: sn40l-node\nsocket:\n  hbm:\n    bandwidth_bytes_per_s: -5\n",
     r"socket.hbm.bandwidth_bytes_per_s: expected a number > 0, got -5"),
    ("base: sn40l-node\nsocket:\n  hbm:\n    capacity_bytes: lots\n", r"socket.hbm.capacity_bytes: expected a number"),
    ("base: sn40l-node\nsocket:\n  hbmm: {}\n", r"socket.hbmm: unknown field"),
    ("base: sn40l-node\nsockets_per_node: 0\n", r"sockets_per_node: expected a whole number >= 1"),
    ("base: nowhere\n", r"unknown platform 'nowhere'"),
    ("base: sn40l-node\nsocket: [1, 2\n", r"line \d+, column \d+: not valid YAML"),
    ("base: sn40l-node\nsocket:\n  efficiency:\n    fused_compute_fraction: 1.5\n", r"expected a number <= 1"),
])
def test_bad_platform_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_platform(str(path))


def test_base_cycle(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"base: {b}\n")
    b.write_text(f"base: {a}\n")
    with pytest.raises(UserError, match="names itself as a base"):
        load_platform(str(a))
