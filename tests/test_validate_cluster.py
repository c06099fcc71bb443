import json
from pathlib import Path

import pytest

from node.cli import main
from node.validate_cluster import validate_cluster

ROOT = Path(__file__).resolve().parent.parent

ON_PREM = """\
cluster_name: rdu-lab
provider: {type: local, head_ip: 10.0.0.10, worker_ips: [10.0.0.11, 10.0.0.12]}
auth: {ssh_user: ubuntu}
setup_commands:
  - cd ~/rdu-emulator && pip install -e .
head_start_ray_commands:
  - ray stop
  - ray start --head --port=6379 --autoscaling-config=~/ray_bootstrap_config.yaml
worker_start_ray_commands:
  - ray stop
  - 'ray start --address=$RAY_HEAD_IP:6379 --resources=''{"rdu_socket":8}'''
"""


def test_shipped_cluster_yaml_is_valid():
    report = validate_cluster(ROOT / "cluster.yaml")
    assert report.ok, report.errors
    assert report.sockets_per_worker == [8, 8] and not report.warnings


def test_on_prem_cluster_with_resources_on_start_lines(tmp_path):
    path = tmp_path / "lab.yaml"
    path.write_text(ON_PREM)
    report = validate_cluster(path)
    assert report.ok, report.errors
    assert report.sockets_per_worker == [8, 8]


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("setup_commands:", "setup_comands:"), "Additional properties are not allowed"),
    (lambda t: t.replace("'ray start --address=$RAY_HEAD_IP:6379 --resources=''{\"rdu_socket\":8}'''",
                         "ray start --address=$RAY_HEAD_IP:6379"), "no `ray start` line advertises"),
    (lambda t: t.replace("'ray start --address=$RAY_HEAD_IP:6379 --resources=''{\"rdu_socket\":8}'''",
                         "ray start --resources='{\"rdu_socket\": 8}'"), "quote the whole command"),
    (lambda t: t.replace("type: local, ", ""), "missing field 'type'"),
])
def test_broken_configs_are_named(tmp_path, edit, message):
    path = tmp_path / "bad.yaml"
    path.write_text(edit(ON_PREM))
    report = validate_cluster(path)
    assert not report.ok
    assert any(message in e for e in report.errors), report.errors


def test_cloud_worker_without_sockets(tmp_path):
    text = (ROOT / "cluster.yaml").read_text().replace('resources: {"rdu_socket": 8}', 'resources: {"CPU": 8}')
    path = tmp_path / "nosockets.yaml"
    path.write_text(text)
    report = validate_cluster(path)
    assert any("available_node_types.rdu_node.resources" in e for e in report.errors)


def test_cli_exit_codes(tmp_path, capsys):
    assert main(["validate-cluster", str(ROOT / "cluster.yaml")]) == 0
    assert "2 emulated node(s), 16 sockets" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster_name: x\nprovider: [\n")
    assert main(["validate-cluster", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["validate-cluster", str(tmp_path / "missing.yaml")]) == 2
    assert json.loads(json.dumps({"ok": True}))
