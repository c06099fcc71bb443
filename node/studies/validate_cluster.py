"""`rdu validate-cluster cluster.yaml`: check a Ray cluster-launcher config offline.

First what `ray up` itself would check (Ray's `prepare_config` + `validate_config`, i.e. the JSON
schema shipped inside Ray plus its extra rules; plain schema validation if those private helpers
move), then this project's rules: worker nodes advertise `rdu_socket` resources (on cloud node
types or on the `ray start --resources` lines of an on-premise cluster), every node the same
count (one emulated node per Ray node), and what makes `ray up` really start this project
(the rules in node/validate_cluster.py's second half, documented in docs/cluster.md):

- the Python of the environment (named interpreter, else the image's release) is new enough;
- the project, `ray[default]` and Ray's cloud SDK (boto3 on AWS) go into the environment that
  `ray start` runs from, and every `ray start`/`ray stop` line uses that environment's `ray`;
- rsync leaves outputs, environments and caches behind;
- the token file that token authentication needs exists here, or the warning says how to make it.

Shell commands are read, not run: the rules follow `cd DIR &&` and `source ENV/bin/activate`
within one command (each command is its own ssh shell) and stay silent when they cannot tell.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rdu.node.cluster.ray_session import SOCKET_RESOURCE
from rdu.yaml_io import read_yaml

__all__ = ["validate_cluster", "ClusterReport"]

_RESOURCES_FLAG = re.compile(r"--resources[= ]+(['\"]?)(\{.*?\})\1")


@dataclass
class ClusterReport:
    path: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sockets_per_worker: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        if not self.sockets_per_worker:
            return "no worker advertises sockets"
        total = sum(self.sockets_per_worker)
        return (f"{len(self.sockets_per_worker)} worker node(s) with {self.sockets_per_worker} '{SOCKET_RESOURCE}' "
                f"resources: {len(self.sockets_per_worker)} emulated node(s), {total} sockets")

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "errors": self.errors, "warnings": self.warnings,
                "sockets_per_worker": self.sockets_per_worker, "summary": self.summary()}


def _schema_errors(config: dict, report: ClusterReport) -> None:
    """Ray's own validation, on a copy with Ray's defaults merged in (what `ray up` checks)."""
    import jsonschema

    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:  # the private helpers moved: fall back to the schema Ray ships
        schema = json.loads((resources.files("ray.autoscaler") / "ray-schema.json").read_text())
        prepare_config, validate_config = (lambda c: c), (lambda c: jsonschema.validate(c, schema))
    quiet = logging.getLogger("ray.autoscaler")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "(top level)"
        message = exc.message
        if "is not of type 'string'" in message and isinstance(exc.instance, dict):
            message += (" -- an unquoted list item containing ': ' (such as --resources='{\"rdu_socket\": 8}') "
                        "is read by YAML as a mapping; quote the whole command or drop the space")
        report.errors.append(f"{report.path}: {where}: {message}")
    except KeyError as exc:
        report.errors.append(f"{report.path}: missing field {exc.args[0]!r} (Ray's cluster launcher needs it)")
    except (ValueError, RuntimeError, TypeError, AssertionError) as exc:
        report.errors.append(f"{report.path}: {exc}")
    except Exception as exc:  # noqa: BLE001 - Ray's provider code raises anything (e.g. a missing SDK)
        report.errors.append(f"{report.path}: Ray rejected the config: {type(exc).__name__}: {exc}")
    finally:
        quiet.setLevel(level)


def _sockets_in_command(command: Any) -> int | None:
    if not isinstance(command, str):
        return None
    match = _RESOURCES_FLAG.search(command)
    if not match:
        return None
    try:
        value = json.loads(match.group(2)).get(SOCKET_RESOURCE)
    except (json.JSONDecodeError, AttributeError):
        return -1
    return value if isinstance(value, int) else -1


def _project_rules(config: dict, report: ClusterReport) -> None:
    node_types = config.get("available_node_types")
    if isinstance(node_types, dict) and node_types:
        head = config.get("head_node_type")
        for name, node_type in node_types.items():
            count = (node_type or {}).get("resources", {}).get(SOCKET_RESOURCE)
            if name == head:
                if count:
                    report.warnings.append(f"{report.path}: available_node_types.{name}: the head node advertises "
                                           f"{count} sockets; the emulator expects sockets on workers only")
                continue
            if not isinstance(count, int) or count < 1:
                report.errors.append(f"{report.path}: available_node_types.{name}.resources: expected "
                                     f"'{SOCKET_RESOURCE}: <sockets per node>' (a whole number >= 1), got {count!r}")
                continue
            workers = node_type.get("max_workers", node_type.get("min_workers", 0)) or 0
            report.sockets_per_worker.extend([count] * int(workers))
    else:
        for command in config.get("worker_start_ray_commands", []) or []:
            count = _sockets_in_command(command)
            if count == -1:
                report.errors.append(f"{report.path}: worker_start_ray_commands: --resources is not JSON with a "
                                     f"whole-number '{SOCKET_RESOURCE}': {command!r}")
            elif count is not None:
                workers = len((config.get("provider") or {}).get("worker_ips", []) or []) or 1
                report.sockets_per_worker.extend([count] * workers)
        if not report.sockets_per_worker:
            report.errors.append(f"{report.path}: worker_start_ray_commands: no `ray start` line advertises "
                                 f"--resources='{{\"{SOCKET_RESOURCE}\":8}}'")
    if len(set(report.sockets_per_worker)) > 1:
        report.warnings.append(f"{report.path}: workers advertise different socket counts "
                               f"{sorted(set(report.sockets_per_worker))}; every emulated node has the same number")


# --- what makes `ray up` really start this project -------------------------------------------------

_OUTPUT_FOLDERS = (".venv", "runs", "sweeps", "reproduce", "bench/results")
_CLOUD_SDK = {"aws": "boto3", "gcp": "google-api-python-client", "azure": "azure-mgmt-compute"}
_UBUNTU_PYTHON = {"18.04": (3, 6), "20.04": (3, 8), "22.04": (3, 10), "24.04": (3, 12), "24.10": (3, 12),
                  "25.04": (3, 13), "25.10": (3, 13)}
_UBUNTU_RELEASE = re.compile(r"ubuntu[\s/_-]*(?:server/)?(\d{2})[._]?(\d{2})", re.IGNORECASE)
_DOCKER_PYTHON = re.compile(r"(?:[-:]py3(\d{1,2})\b|python:?3\.(\d{1,2}))")
_PIP_INSTALL = re.compile(r"(?:^|\s)(?P<exe>\S*?(?:pip3?(?:\.\d+)?|python3?(?:\.\d+)?\s+-m\s+pip))\s+install\b"
                          r"(?P<args>.*)")
_RAY_VERB = re.compile(r"(?:^|\s)(?P<exe>\S*)\s+(?P<verb>start|stop)\b")
_VENV = (re.compile(r"(?:^|\s)\S*?python(?:(?P<version>3\.\d+)|3)?\s+-m\s+venv\b"),
         re.compile(r"\buv\s+venv\b(?:.*?(?:--python|-p)[=\s]+(?:python)?(?P<version>3\.\d+))?"),
         re.compile(r"\bvirtualenv\b(?:.*?(?:--python|-p)[=\s]+\S*?(?P<version>3\.\d+))?"),
         re.compile(r"\bconda\s+create\b(?:.*?python=(?P<version>3\.\d+))?"))
_SEPARATORS = re.compile(r"&&|\|\||;|\|")


@dataclass
class _Install:
    """One `pip install` found in a setup command: where it installs and what."""
    where: str
    env_bin: str | None          # the bin/ folder of the pip used; None: whatever `pip` is on PATH
    packages: dict[str, tuple[set[str], str | None]]   # name -> (extras, pinned version)
    installs_project: bool


def _norm(path: str) -> str:
    """One spelling per remote path, so `$HOME/x`, `${HOME}/x` and `~/x/./` compare equal."""
    path = path.strip("'\"")
    path = re.sub(r"^(\$HOME|\$\{HOME\})(?=/|$)", "~", path)
    path = re.sub(r"^(\./)+(?=.)", "", re.sub(r"/\./|/+", "/", path + "/")).rstrip("/")
    return path or "/"


def _env_name(env_bin: str) -> str:
    """The environment folder of a bin/ folder, as users name it in messages."""
    return env_bin[:-4] if env_bin.endswith("/bin") else env_bin


def _join(cwd: str | None, path: str) -> str:
    """A path as the shell sees it after `cd cwd` (relative paths stay relative when cwd is unknown)."""
    path = _norm(path)
    if cwd is None or path.startswith(("/", "~")):
        return path
    return _norm(f"{cwd}/{path}")


def _segments(command: str) -> list[tuple[str | None, str | None, str]]:
    """(cwd, activated env bin, simple command) for each part of one shell command line."""
    cwd = active = None
    parts = []
    for part in _SEPARATORS.split(command):
        part = part.strip()
        if match := re.fullmatch(r"cd\s+(\S+)", part):
            cwd = _join(cwd, match.group(1))
        elif match := re.fullmatch(r"(?:source|\.)\s+(\S+)/activate", part):
            active = _join(cwd, match.group(1))
        elif part:
            parts.append((cwd, active, part))
    return parts


def _ray_defaults(config: dict) -> dict:
    """Ray's defaults for the provider: what `ray up` runs for a command list the config leaves out."""
    try:
        from ray.autoscaler._private.util import _get_default_config

        return _get_default_config(config.get("provider") or {}) or {}
    except Exception:  # noqa: BLE001 - unknown provider or the private helper moved: no defaults known
        return {}


def _command_list(config: dict, defaults: dict, key: str) -> tuple[list[str], bool]:
    """The commands `ray up` runs for `key`, and whether they are Ray's defaults (not in the config)."""
    if key in config:
        return [str(c) for c in config.get(key) or []], False
    return [str(c) for c in defaults.get(key) or []], True


def _requirements(args: str) -> dict[str, tuple[set[str], str | None]]:
    """Package name -> (extras, `==` version) for the requirement words of a pip command line."""
    found = {}
    for word in args.split():
        word = word.strip("'\"")
        match = re.fullmatch(r"([A-Za-z][A-Za-z0-9._-]*)(?:\[([^\]]*)\])?(?:(==|>=|<=|~=|!=|>|<)(\S+))?", word)
        if match and not word.startswith("-"):
            extras = {e.strip() for e in (match.group(2) or "").split(",") if e.strip()}
            pinned = match.group(4) if match.group(3) == "==" else None
            found[match.group(1).lower().replace("_", "-")] = (extras, pinned)
    return found


def _installs(config: dict, defaults: dict, keys: tuple[str, ...]) -> list[_Install]:
    """Every pip install of the given setup lists, with the environment it installs into."""
    found = []
    for key in keys:
        commands, _ = _command_list(config, defaults, key)
        for i, command in enumerate(commands):
            for cwd, active, part in _segments(command):
                match = _PIP_INSTALL.search(part)
                if not match:
                    continue
                exe = match.group("exe").split()[0]
                env_bin = _join(cwd, exe.rsplit("/", 1)[0]) if "/" in exe else active
                words = [w.strip("'\"") for w in match.group("args").split()]
                project = any(w in (".", "./") or w.startswith((".[", "./[")) or _norm(w).endswith("rdu-emulator")
                              for w in words)
                found.append(_Install(f"{key}[{i}]", env_bin, _requirements(match.group("args")), project))
    return found


def _project_env(installs: list[_Install], report: ClusterReport) -> tuple[bool, str | None]:
    """(project installed?, bin folder of its environment) from the setup commands."""
    for install in installs:
        if install.installs_project:
            return True, install.env_bin
    report.warnings.append(f"{report.path}: setup_commands do not seem to install this project "
                           f"(pip install -e . in the synced folder); socket actors import it on every node")
    return False, None


def _start_rules(config: dict, defaults: dict, env_bin: str, report: ClusterReport) -> None:
    """Every `ray start`/`ray stop` uses the environment's `ray`: its workers import the project."""
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands, from_ray = _command_list(config, defaults, key)
        origin = f" (Ray's default: the config does not set {key})" if from_ray else ""
        for i, command in enumerate(commands):
            for cwd, active, part in _segments(command):
                for match in _RAY_VERB.finditer(part):
                    exe = match.group("exe")
                    if exe != "ray" and not exe.endswith("/ray"):
                        continue
                    used = _join(cwd, exe.rsplit("/", 1)[0]) if "/" in exe else active
                    if used != env_bin:
                        runs = f"{used}/ray" if used else "`ray` from PATH"
                        report.errors.append(
                            f"{report.path}: {key}[{i}]{origin}: `ray {match.group('verb')}` runs {runs}, not "
                            f"{env_bin}/ray of the environment the project is installed in; Ray must start from "
                            f"that environment (its workers import the project)")


def _sdk_rules(config: dict, installs: list[_Install], env_bin: str | None, from_ray: bool,
               report: ClusterReport) -> None:
    """The autoscaler on the head imports the cloud SDK from the environment Ray runs from."""
    sdk = _CLOUD_SDK.get(str((config.get("provider") or {}).get("type")))
    if sdk is None or env_bin is None:
        return
    elsewhere = [i for i in installs if sdk in i.packages and i.env_bin != env_bin]
    if any(sdk in i.packages and i.env_bin == env_bin for i in installs):
        return
    if elsewhere:
        where = elsewhere[0].where + (" (Ray's default: the config does not set head_setup_commands)"
                                      if from_ray and elsewhere[0].where.startswith("head_setup") else "")
        report.errors.append(f"{report.path}: {where}: installs {sdk} with `pip` from PATH, not into "
                             f"{_env_name(env_bin)}, "
                             f"where Ray and its autoscaler run (and Ubuntu 24.04's system pip refuses); "
                             f"use head_setup_commands: ['{env_bin}/pip install {sdk}']")
    else:
        report.errors.append(f"{report.path}: head_setup_commands: nothing installs {sdk} into {_env_name(env_bin)}; "
                             f"the autoscaler on the head needs it to launch workers")


def _ray_package_rules(installs: list[_Install], env_bin: str, report: ClusterReport) -> None:
    """ray[default] in the environment (job server, dashboard) and the same Ray version as here."""
    rays = [i.packages["ray"] for i in installs if "ray" in i.packages and i.env_bin == env_bin]
    if not any("default" in extras for extras, _ in rays):
        report.warnings.append(f"{report.path}: setup_commands do not install ray[default] into "
                               f"{_env_name(env_bin)}: the project depends on plain ray, without the dashboard "
                               f"`ray job submit` needs")
    import ray

    for _, pinned in rays:
        if pinned and pinned != ray.__version__:
            report.warnings.append(f"{report.path}: setup_commands install ray {pinned} on the cluster, this "
                                   f"machine has ray {ray.__version__}; `ray up` and `ray job submit` need the same")


def _required_python() -> tuple[int, int]:
    """The project's minimum Python (pyproject's requires-python), 3.11 if the metadata is missing."""
    try:
        from importlib.metadata import metadata

        match = re.search(r">=\s*(\d+)\.(\d+)", metadata("rdu-emulator")["Requires-Python"] or "")
    except Exception:  # noqa: BLE001 - not installed as a distribution (e.g. a plain checkout)
        match = None
    return (int(match.group(1)), int(match.group(2))) if match else (3, 11)


def _image_texts(tree: Any, under_image: bool = False) -> list[str]:
    """Values of node_config keys naming an image (ImageId, sourceImage, imageReference, ...)."""
    if isinstance(tree, dict):
        found = []
        for key, value in tree.items():
            inner = _image_texts(value, under_image or "image" in str(key).lower())
            found += [" ".join(inner)] if inner and isinstance(value, dict) else inner
        return found
    if isinstance(tree, list):
        return [s for v in tree for s in _image_texts(v, under_image)]
    return [str(tree)] if under_image and isinstance(tree, (str, int, float)) else []


def _ubuntu_python(texts: list[str]) -> tuple[str, tuple[int, int]] | None:
    """("Ubuntu YY.MM", its python3) when one of the texts names a known Ubuntu release."""
    for text in texts:
        if match := _UBUNTU_RELEASE.search(text):
            release = f"{match.group(1)}.{match.group(2)}"
            if release in _UBUNTU_PYTHON:
                return f"Ubuntu {release}", _UBUNTU_PYTHON[release]
    return None


def _image_pythons(config: dict, raw_text: str) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """Python of each image the config names, when its release says it: ({image: version}, [unknown])."""
    known, unknown = {}, []
    docker = config.get("docker") or {}
    for image in sorted({str(docker.get(k)) for k in ("image", "head_image", "worker_image") if docker.get(k)}):
        match = _DOCKER_PYTHON.search(image)
        if match:
            known[image] = (3, int(match.group(1) or match.group(2)))
        else:
            unknown.append(image)
    if docker.get("image") or docker.get("head_image"):
        return known, unknown   # commands run in the container: the host image does not matter
    for node_type in (config.get("available_node_types") or {}).values():
        for image in _image_texts((node_type or {}).get("node_config") or {}):
            comments = [line.split("#", 1)[1] for line in raw_text.splitlines() if image in line and "#" in line]
            found = _ubuntu_python([image] + comments)
            if found:
                known[f"{image} ({found[0]})" if found[0].split()[1] not in image else image] = found[1]
            elif image not in unknown:
                unknown.append(image)
    return known, unknown


def _env_python(config: dict, defaults: dict) -> tuple[tuple[int, int] | None, bool, str]:
    """(named Python of the environment, whether the image's python3 makes it, the setup text)."""
    text = " ; ".join(c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                                     "worker_setup_commands") for c in _command_list(config, defaults, key)[0])
    for pattern in _VENV:
        if match := pattern.search(text):
            version = match.group("version")
            return (tuple(int(x) for x in version.split(".")) if version else None), not version, text
    return None, True, text


def _python_rules(config: dict, defaults: dict, raw_text: str, report: ClusterReport) -> None:
    """The environment's Python meets requires-python, judged from the named interpreter or the image."""
    need = _required_python()
    named, uses_image, setup = _env_python(config, defaults)
    images, unknown = _image_pythons(config, raw_text)
    need_text = f"{need[0]}.{need[1]}"
    if named:
        if named < need:
            report.errors.append(f"{report.path}: setup_commands create the environment with Python "
                                 f"{named[0]}.{named[1]}; the project needs >= {need_text} (pyproject.toml)")
        for image, version in images.items():
            if version != named and not re.search(rf"install[^;&|]*python{named[0]}\.{named[1]}\b", setup):
                report.warnings.append(f"{report.path}: {image} has python{version[0]}.{version[1]}, and no setup "
                                       f"command installs python{named[0]}.{named[1]}, which the environment uses")
        return
    if not uses_image:
        return
    for image, version in images.items():
        if version < need:
            report.errors.append(f"{report.path}: {image} has Python {version[0]}.{version[1]} (its python3 makes "
                                 f"the environment); the project needs >= {need_text}: use Ubuntu 24.04 (3.12) "
                                 f"or install python3.{need[1]} (apt, uv) and create the venv with it")
    if unknown and str((config.get("provider") or {}).get("type")) != "local":
        report.warnings.append(f"{report.path}: cannot tell the Python of {unknown[0]}; the project needs >= "
                               f"{need_text}: name the interpreter in setup_commands (python3.12 -m venv .venv)")


def _excluded(patterns: list[str], folder: str) -> bool:
    """Whether one of rsync's exclude patterns leaves `folder` (at the synced root) behind."""
    for pattern in patterns:
        bare = re.sub(r"(/\*{1,3})+$", "", pattern.strip()).rstrip("/")
        bare = re.sub(r"^(/|\*\*/)", "", bare)
        if bare and fnmatch.fnmatchcase(folder, bare):
            return True
    return False


def _rsync_patterns(config: dict, mounts: list[Path]) -> list[str]:
    """rsync_exclude plus the patterns of rsync_filter files found in the synced folders."""
    patterns = [str(p) for p in config.get("rsync_exclude") or []]
    for name in config.get("rsync_filter") or []:
        for folder in mounts:
            merge = folder / str(name)
            if merge.is_file():
                lines = merge.read_text(encoding="utf-8", errors="replace").splitlines()
                patterns += [re.sub(r"^-\s+", "", ln.strip()) for ln in lines if ln.strip() and ln[0] not in "#!+"]
    return patterns


def _mount_rules(config: dict, defaults: dict, report: ClusterReport) -> None:
    """Synced folders leave outputs behind; every local path exists; token auth has its token."""
    mounts = config.get("file_mounts") or {}
    folders, token_mounted = [], False
    for remote, local in (mounts.items() if isinstance(mounts, dict) else []):
        here = Path(str(local)).expanduser()
        if _norm(str(remote)).endswith(".ray/auth_token") or here.name == "auth_token":
            token_mounted = True
            if not here.exists():
                report.warnings.append(f"{report.path}: file_mounts: the token file {local} does not exist here; "
                                       f"create it with `ray get-auth-token --generate` (writes ~/.ray/auth_token) "
                                       f"before `ray up`, which stops on a missing mount")
        elif not here.exists():
            report.errors.append(f"{report.path}: file_mounts.{remote}: {local} does not exist here "
                                 f"(`ray up` resolves it from the folder it is run in, and stops)")
        elif here.is_dir():
            folders.append(here)
    patterns = _rsync_patterns(config, folders)
    missing = [f"{f}/" for f in _OUTPUT_FOLDERS if folders and not _excluded(patterns, f)]
    if missing:
        report.errors.append(f"{report.path}: rsync_exclude: {', '.join(missing)} not excluded: `ray up` would "
                             f"copy outputs and environments to every node (sweeps/ and reproduce/ reach GBs); "
                             f"add e.g. \"/{missing[0]}\"")
    _token_rules(config, defaults, token_mounted, report)


def _auth_mode(commands: list[str]) -> str | None:
    """The RAY_AUTH_MODE the `ray start` lines set (None: not set, Ray's own default applies)."""
    modes = [m.group(1) for c in commands for m in re.finditer(r"\bRAY_AUTH_MODE=['\"]?(\w+)", c)]
    return modes[-1].lower() if modes else None


def _token_rules(config: dict, defaults: dict, token_mounted: bool, report: ClusterReport) -> None:
    """Head and workers agree on token auth, and every node has the token file when it is on."""
    head = _auth_mode(_command_list(config, defaults, "head_start_ray_commands")[0])
    worker = _auth_mode(_command_list(config, defaults, "worker_start_ray_commands")[0])
    if head != worker:
        report.errors.append(f"{report.path}: head_start_ray_commands set RAY_AUTH_MODE={head or '(unset)'}, "
                             f"worker_start_ray_commands RAY_AUTH_MODE={worker or '(unset)'}: workers could not join")
    elif head == "token" and not token_mounted:
        report.errors.append(f"{report.path}: file_mounts: `ray start` with RAY_AUTH_MODE=token stops without a "
                             f"token on the node; mount one: \"~/.ray/auth_token\": \"~/.ray/auth_token\"")
    elif head is None and token_mounted:
        report.warnings.append(f"{report.path}: the auth token is mounted but no `ray start` line sets "
                               f"RAY_AUTH_MODE=token; set it on the head and worker lines so all nodes agree")


def _launch_rules(config: dict, raw_text: str, report: ClusterReport) -> None:
    """The rules that decide whether `ray up` brings up a cluster that can run this project."""
    defaults = _ray_defaults(config)
    installs = _installs(config, defaults, ("setup_commands", "head_setup_commands", "worker_setup_commands"))
    installed, env_bin = _project_env(installs, report)
    if installed and env_bin is not None:
        _start_rules(config, defaults, env_bin, report)
        _ray_package_rules(installs, env_bin, report)
    head_installs = _installs(config, defaults, ("setup_commands", "head_setup_commands"))
    _sdk_rules(config, head_installs, env_bin, "head_setup_commands" not in config, report)
    _python_rules(config, defaults, raw_text, report)
    _mount_rules(config, defaults, report)


def validate_cluster(path: str | Path) -> ClusterReport:
    """Everything `ray up` would reject plus what would make the cluster start but not work."""
    report = ClusterReport(path=str(path))
    config = read_yaml(path)
    if not isinstance(config, dict):
        report.errors.append(f"{path}: expected a mapping of cluster-launcher fields, got {type(config).__name__}")
        return report
    _schema_errors(config, report)
    _project_rules(config, report)   # the user's own fields: Ray rewrites on-premise configs
    raw_text = Path(path).read_text(encoding="utf-8")
    _launch_rules(config, raw_text, report)
    return report
