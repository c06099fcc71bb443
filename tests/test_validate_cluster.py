import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from rdu.node.cli.main import main
from rdu.node.studies.validate_cluster import validate_cluster

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = (ROOT / "cluster.yaml").read_text()

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

VENV_RAY = "~/rdu-emulator/.venv/bin/ray"
WORKER_START = f"RAY_AUTH_MODE=token {VENV_RAY} start --address"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A HOME with the Ray token the shipped config mounts (`ray get-auth-token --generate` makes it)."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("0" * 64)
    monkeypatch.setenv("HOME", str(home))
    return home


def check(tmp_path, text):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return validate_cluster(path)


def test_shipped_cluster_yaml_is_valid(home):
    report = validate_cluster(ROOT / "cluster.yaml")
    assert report.ok, report.errors
    assert report.sockets_per_worker == [8, 8] and not report.warnings, report.warnings


def test_shipped_cluster_yaml_passes_rays_schema_with_defaults():
    """What `ray up` sees after merging Ray's AWS defaults: our command lists, not Ray's bare pip/ray."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    merged = prepare_config(yaml.safe_load(SHIPPED))
    validate_config(merged)
    assert all("boto3" not in c or ".venv/bin/pip" in c for c in merged["head_setup_commands"])
    assert all(c.startswith(VENV_RAY) or f" {VENV_RAY} " in c for c in merged["head_start_ray_commands"])


def test_missing_token_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    report = validate_cluster(ROOT / "cluster.yaml")
    assert report.ok
    assert len(report.warnings) == 1 and "ray get-auth-token --generate" in report.warnings[0]


def test_on_prem_cluster_with_resources_on_start_lines(tmp_path):
    report = check(tmp_path, ON_PREM)
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
def test_broken_on_prem_configs_are_named(tmp_path, edit, message):
    report = check(tmp_path, edit(ON_PREM))
    assert not report.ok
    assert any(message in e for e in report.errors), report.errors


SSM_2404 = "ubuntu/server/24.04/"
BROKEN_SHIPPED = {
    # the image's python3 is too old for requires-python
    "image-python-3.10": (lambda t: t.replace(SSM_2404, "ubuntu/server/22.04/").replace("python3.12 -m venv",
                                                                                         "python3 -m venv"),
                          "ubuntu/server/22.04/stable/current/amd64/hvm/ebs-gp3/ami-id has Python 3.10"),
    "old-ami-comment": (lambda t: t.replace(
        "ImageId: resolve:ssm:/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id",
        "ImageId: ami-0e5fe1b8bd5f3f1d6  # Ubuntu 22.04 LTS").replace("python3.12 -m venv", "python3 -m venv"),
        "ami-0e5fe1b8bd5f3f1d6 (Ubuntu 22.04) has Python 3.10"),
    "named-python-3.10": (lambda t: t.replace("python3.12 -m venv", "python3.10 -m venv"),
                          "create the environment with Python 3.10"),
    # Ray started from another environment than the project's
    "worker-ray-from-path": (lambda t: t.replace(WORKER_START, "RAY_AUTH_MODE=token ray start --address"),
                             "worker_start_ray_commands[1]: `ray start` runs `ray` from PATH"),
    "head-ray-other-venv": (lambda t: t.replace(f"RAY_AUTH_MODE=token {VENV_RAY} start --head",
                                                "RAY_AUTH_MODE=token ~/other/bin/ray start --head"),
                            "head_start_ray_commands[1]: `ray start` runs ~/other/bin/ray"),
    "default-start-commands": (lambda t: t.split("head_start_ray_commands:")[0].replace(
        "RAY_AUTH_MODE=token", ""), "(Ray's default: the config does not set head_start_ray_commands)"),
    # the cloud SDK outside the environment, or nowhere
    "default-head-setup": (lambda t: t.replace("head_setup_commands:\n  - ~/rdu-emulator/.venv/bin/pip install -q "
                                               "\"boto3>=1.26\"\n", ""),
                           "installs boto3 with `pip` from PATH"),
    "no-boto3": (lambda t: t.replace("head_setup_commands:\n  - ~/rdu-emulator/.venv/bin/pip install -q "
                                     "\"boto3>=1.26\"\n", "head_setup_commands: []\n"),
                 "nothing installs boto3 into ~/rdu-emulator/.venv"),
    # outputs shipped by rsync
    "rsync-ships-sweeps": (lambda t: t.replace('  - "/sweeps/"\n', "").replace('  - "/reproduce/"\n', ""),
                           "rsync_exclude: sweeps/, reproduce/ not excluded"),
    "rsync-ships-venv": (lambda t: t.replace('  - "/.venv/"\n', ""), "rsync_exclude: .venv/ not excluded"),
    # token authentication
    "worker-auth-mode-unset": (lambda t: t.replace(WORKER_START, f"{VENV_RAY} start --address"),
                               "RAY_AUTH_MODE=(unset): workers could not join"),
    "token-not-mounted": (lambda t: t.replace('  "~/.ray/auth_token": "~/.ray/auth_token"', ""),
                          "stops without a token on the node"),
    "mount-missing-here": (lambda t: t.replace('"~/rdu-emulator": "."', '"~/rdu-emulator": "./no-such-folder"'),
                           "no-such-folder does not exist here"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_SHIPPED))
def test_shipped_config_broken_one_rule_at_a_time(home, tmp_path, case):
    edit, message = BROKEN_SHIPPED[case]
    text = edit(SHIPPED)
    assert text != SHIPPED
    report = check(tmp_path, text)
    assert not report.ok
    assert any(message in e for e in report.errors), report.errors


WARNED_SHIPPED = {
    "no-ray-default": (lambda t: t.replace('"ray[default]==2.60.0"', ""), "do not install ray[default]"),
    "ray-version-differs": (lambda t: t.replace("ray[default]==2.60.0", "ray[default]==2.50.0"),
                            "install ray 2.50.0 on the cluster"),
    "unknown-image": (lambda t: t.replace("resolve:ssm:/aws/service/canonical/ubuntu/server/24.04/stable/current/"
                                          "amd64/hvm/ebs-gp3/ami-id", "ami-0123456789abcdef0")
                      .replace("python3.12 -m venv", "python3 -m venv"),
                      "cannot tell the Python of ami-0123456789abcdef0"),
    "named-python-not-on-image": (lambda t: t.replace(SSM_2404, "ubuntu/server/22.04/")
                                  .replace("install -y python3.12-venv", "install -y python3-venv"),
                                  "no setup command installs python3.12"),
    "token-without-auth-mode": (lambda t: t.replace("RAY_AUTH_MODE=token ", ""), "no `ray start` line sets"),
}


@pytest.mark.parametrize("case", sorted(WARNED_SHIPPED))
def test_shipped_config_doubtful_edits_warn(home, tmp_path, case):
    edit, message = WARNED_SHIPPED[case]
    text = edit(SHIPPED)
    assert text != SHIPPED
    report = check(tmp_path, text)
    assert report.ok, report.errors
    assert any(message in w for w in report.warnings), report.warnings


@pytest.mark.parametrize("start", [
    "source ~/rdu-emulator/.venv/bin/activate && RAY_AUTH_MODE=token ray start --address",
    "cd ~/rdu-emulator && RAY_AUTH_MODE=token .venv/bin/ray start --address",
    "RAY_AUTH_MODE=token $HOME/rdu-emulator/.venv/bin/ray start --address",
])
def test_other_spellings_of_the_same_environment(home, tmp_path, start):
    report = check(tmp_path, SHIPPED.replace(WORKER_START, start))
    assert report.ok and not report.warnings, (report.errors, report.warnings)


def test_rsync_filter_file_counts_as_excluding(home, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / ".gitignore").write_text("# outputs\n.venv/\nruns/\nsweeps/\nreproduce/\nbench/results/\n")
    text = SHIPPED.replace('"~/rdu-emulator": "."', f'"~/rdu-emulator": "{project}"')
    text = text.split("rsync_exclude:")[0] + 'rsync_filter: [".gitignore"]\n' + "setup_commands:" + \
        text.split("setup_commands:", 1)[1]
    report = check(tmp_path, text)
    assert report.ok and not report.warnings, (report.errors, report.warnings)
    (project / ".gitignore").write_text("runs/\n")
    assert any("sweeps/" in e for e in check(tmp_path, text).errors)


def _tree(root: Path, files: list[str]) -> None:
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)


def _rsync(source: str, target: Path) -> set[str]:
    """rsync with the exclude arguments Ray's SSH command runner builds from cluster.yaml."""
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    options = {"rsync_exclude": yaml.safe_load(SHIPPED)["rsync_exclude"], "rsync_filter": []}
    args = SSHCommandRunner._create_rsync_filter_args(None, options)
    subprocess.run(["rsync", "-a", *args, source, str(target)], check=True, capture_output=True)
    return {str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()}


@pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync")
def test_rsync_ships_the_source_and_fetches_results(tmp_path):
    """The real rsync, with Ray's arguments: sources go up, outputs stay, `ray rsync-down` of a study works."""
    project = tmp_path / "project"
    sources = ["pyproject.toml", "node/reproduce.py", "node/sweep.py", "bench/run.py", "experiments/scale-out.yaml",
               "protos/interconnect_pb2.py", ".git/HEAD"]
    outputs = ["runs/demo/summary.json", "sweeps/scale-out/points/a/summary.json", "reproduce/REPORT.md",
               "bench/results/latest.json", ".venv/bin/python", "node/__pycache__/cli.cpython-311.pyc",
               "rdu_emulator.egg-info/PKG-INFO", ".pytest_cache/v/x"]
    _tree(project, sources + outputs)
    assert _rsync(f"{project}/", tmp_path / "up") == set(sources)
    study = ["points/a/summary.json", "points/a/runs-note.txt", "REPORT.md", "throughput.png"]
    _tree(project / "sweeps" / "scale-out", study[1:])
    assert _rsync(f"{project}/sweeps/scale-out/", tmp_path / "down") == set(study)
    # without the trailing slash rsync sends the folder itself, which "/sweeps/" would exclude whole
    assert _rsync(f"{project}/sweeps", tmp_path / "down-no-slash") == set()


def test_cli_exit_codes(home, tmp_path, capsys):
    assert main(["validate-cluster", str(ROOT / "cluster.yaml")]) == 0
    assert "2 emulated node(s), 16 sockets" in " ".join(capsys.readouterr().out.split())
    assert main(["validate-cluster", "--json", str(ROOT / "cluster.yaml")]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster_name: x\nprovider: [\n")
    assert main(["validate-cluster", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["validate-cluster", str(tmp_path / "missing.yaml")]) == 2


def test_image_python3_is_enough_on_ubuntu_2404(home, tmp_path):
    """`python3 -m venv` takes the image's Python: 3.12 on Ubuntu 24.04 meets requires-python."""
    report = check(tmp_path, SHIPPED.replace("python3.12 -m venv", "python3 -m venv"))
    assert report.ok and not report.warnings, (report.errors, report.warnings)
