"""Security properties of the repository's own source and configs, checked by parsing them.

- Python (every ``.py`` file, parsed with ``ast``): no unpickling call (``pickle``/``dill``/
  ``cloudpickle``/``joblib`` ``load(s)``, ``numpy.load(allow_pickle=True)``, ``yaml.load``
  without a safe loader), and every ``torch.load`` passes ``weights_only=True``.
- Binding: no Python string is ``0.0.0.0`` or ``::``; every function parameter and every
  command-line option (of the real ``meshline`` parser, plugins included) named like a host
  or bind address defaults to a loopback address; in the Ray launcher config every
  ``--*host`` flag is loopback. Kubernetes manifests may bind ``0.0.0.0`` inside a pod (the
  pod's own network namespace) but expose nothing: Services are ClusterIP, no hostNetwork,
  no hostPort.
- Ray token authentication: no file sets ``RAY_AUTH_MODE`` to anything but ``token``;
  every ``ray start`` in the launcher config runs with ``RAY_AUTH_MODE=token``; the
  RayCluster asks KubeRay for token auth.
- Secrets: no value in ``configs/`` or ``cluster/`` carries a password in a URL, a
  credential-named key with a literal value, or a well-known token format.
"""

from __future__ import annotations

import argparse
import ast
import ipaddress
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
TEXT_SUFFIXES = {".py", ".yaml", ".yml", ".toml", ".md", ".sh", ".cfg", ".txt", ".json", ""}
UNPICKLERS = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "_pickle"}
HOST_NAMES = re.compile(r"(^|_)(host|bind|listen|bind_address|host_address)$")
CREDENTIAL_KEYS = re.compile(
    r"pass(word)?|secret|token|api[_-]?key|credential|private[_-]?key", re.I
)
TOKEN_FORMATS = {
    "AWS access key": re.compile(r"\bA(KIA|SIA)[0-9A-Z]{16}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    "Google API key": re.compile(r"\bAIza[0-9A-Za-z_\-]{35}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "Slack token": re.compile(r"\bxox[abpr]-[A-Za-z0-9-]{10,}"),
}
# A password in a URL, unless it is a placeholder ($PW, ${PW}, <password>).
URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.\-]*://[^/\s:@'\"]+:(?![$<{])[^/\s@'\"]+@", re.I)


def repo_files(suffixes: set[str]) -> list[Path]:
    """The repository's files (tracked, or new and not ignored) with these suffixes."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    paths = (ROOT / name for name in sorted(set(listed.split("\0"))) if name)
    return [p for p in paths if p.suffix in suffixes and p.is_file()]


PYTHON = [p for p in repo_files({".py"})]
THIS_FILE = Path(__file__).resolve()


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def dotted(node: ast.AST) -> str:
    """``a.b.c`` for a Name/Attribute chain, else ''."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def imported_names(tree: ast.Module) -> dict[str, str]:
    """Local name -> fully qualified name for ``import x as y`` and ``from x import y``."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def calls(tree: ast.Module) -> Iterator[tuple[str, ast.Call]]:
    """Every call with its callee's fully qualified name (resolved through imports)."""
    names = imported_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = dotted(node.func)
            if name:
                head, _, rest = name.partition(".")
                resolved = names.get(head, head)
                yield (f"{resolved}.{rest}" if rest else resolved), node


def keyword(call: ast.Call, name: str) -> Any:
    """The literal value of keyword ``name`` (``...`` if absent, None if not a literal)."""
    for kw in call.keywords:
        if kw.arg == name:
            try:
                return ast.literal_eval(kw.value)
            except ValueError:
                return dotted(kw.value) or None
    return ...


def where(path: Path, node: ast.AST) -> str:
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    return f"{shown}:{node.lineno}"


def unsafe_loads(path: Path) -> list[str]:
    found = []
    for name, call in calls(parsed(path)):
        module, _, function = name.rpartition(".")
        if module in UNPICKLERS and function in {"load", "loads", "Unpickler"}:
            found.append(f"{where(path, call)}: {name}")
        elif name == "torch.load" and keyword(call, "weights_only") is not True:
            found.append(f"{where(path, call)}: torch.load without weights_only=True")
        elif name in {"numpy.load", "np.load"} and keyword(call, "allow_pickle") is True:
            found.append(f"{where(path, call)}: numpy.load(allow_pickle=True)")
        elif name == "yaml.load":
            loader = keyword(call, "Loader")
            if not (isinstance(loader, str) and "Safe" in loader):
                found.append(f"{where(path, call)}: yaml.load without a SafeLoader")
    return found


def test_checker_sees_unsafe_loads(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import pickle as p\nimport torch\nfrom numpy import load\nimport yaml\n"
        "p.loads(b'')\ntorch.load('x')\ntorch.load('x', weights_only=True)\n"
        "load('x', allow_pickle=True)\nyaml.load('a')\nyaml.load('a', Loader=yaml.SafeLoader)\n"
    )
    found = unsafe_loads(sample)
    assert [f.split(": ", 1)[1] for f in found] == [
        "pickle.loads",
        "torch.load without weights_only=True",
        "numpy.load(allow_pickle=True)",
        "yaml.load without a SafeLoader",
    ]


def test_no_unpickling_of_untrusted_data():
    assert len(PYTHON) > 20
    found = [f for path in PYTHON for f in unsafe_loads(path)]
    assert not found, found


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_defaults(path: Path) -> Iterator[tuple[str, str, Any]]:
    """(where, name, default) for parameters named like a host address with a str default,
    and for string constants that are wildcard addresses."""
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Constant) and node.value in ("0.0.0.0", "::"):
            yield where(path, node), "a string constant", node.value
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args.posonlyargs + node.args.args
            positional = list(
                zip(
                    arguments[len(arguments) - len(node.args.defaults) :],
                    node.args.defaults,
                    strict=True,
                )
            )
            keyword_only = [
                (a, d)
                for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults, strict=True)
                if d is not None
            ]
            for arg, default in positional + keyword_only:
                if (
                    HOST_NAMES.search(arg.arg)
                    and isinstance(default, ast.Constant)
                    and isinstance(default.value, str)
                ):
                    yield where(path, node), arg.arg, default.value


def test_python_binds_nothing_to_all_interfaces_by_default():
    # Tests may name wildcard addresses (to check that configs do not use them).
    source = [p for p in PYTHON if "tests" not in p.relative_to(ROOT).parts]
    assert source
    bad = [
        f"{place}: {name} = {value!r}"
        for path in source
        for place, name, value in host_defaults(path)
        if not is_loopback(value)
    ]
    assert not bad, bad


def options(
    parser: argparse.ArgumentParser, prefix: str = "meshline"
) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from options(sub, f"{prefix} {name}")
        else:
            yield prefix, action


def test_cli_host_options_default_to_loopback():
    hosts = [
        (command, action)
        for command, action in options(build_parser())
        if any(HOST_NAMES.search(s.lstrip("-").replace("-", "_")) for s in action.option_strings)
    ]
    # `meshline ui` starts a server: it must be among them.
    assert any(command.endswith(" ui") for command, _ in hosts)
    bad = [
        f"{c} {a.option_strings}: {a.default!r}"
        for c, a in hosts
        if not is_loopback(str(a.default))
    ]
    assert not bad, bad


def yaml_documents(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def walk(value: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """(key, leaf) for every leaf of a YAML document; list items keep their parent's key."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from walk(v, str(k))
    elif isinstance(value, list):
        for item in value:
            yield from walk(item, key)
    else:
        yield key, value


def launcher_configs() -> list[Path]:
    return [
        p for p in sorted((ROOT / "cluster").glob("*.yaml")) if "provider" in yaml_documents(p)[0]
    ]


def test_ray_launcher_binds_loopback_and_keeps_token_auth():
    configs = launcher_configs()
    assert configs
    for path in configs:
        config = yaml_documents(path)[0]
        commands = [str(v) for _, v in walk(config) if isinstance(v, str)]
        for flag, host in re.findall(r"(--[\w-]*host)[= ](\S+)", "\n".join(commands)):
            assert is_loopback(host), f"{path.name}: {flag}={host}"
        starts = [c for c in commands if re.search(r"\bray start\b", c)]
        assert starts, f"{path.name}: no ray start command"
        for command in starts:
            assert "RAY_AUTH_MODE=token" in command, f"{path.name}: {command}"


def kubernetes_objects() -> list[tuple[Path, dict]]:
    return [
        (path, doc)
        for path in sorted((ROOT / "cluster").rglob("*.yaml"))
        for doc in yaml_documents(path)
        if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc
    ]


def test_kubernetes_manifests_expose_nothing_outside_the_cluster():
    objects = kubernetes_objects()
    assert objects
    for path, doc in objects:
        name = f"{path.name}: {doc['kind']} {doc.get('metadata', {}).get('name')}"
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", name
        for key, value in walk(doc):
            assert not (key == "hostNetwork" and value is True), name
            assert key != "hostPort", name
            if key == "serviceType":
                assert value == "ClusterIP", name
        if doc["kind"] == "RayCluster":
            assert doc["spec"]["authOptions"]["mode"] == "token", name


AUTH_IN_TEXT = re.compile(r"""RAY_AUTH_MODE['"]?\s*[:=]\s*['"]?([A-Za-z_]+)""")


def auth_settings_in_python(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, value) wherever Python code sets RAY_AUTH_MODE: a dict entry, an item
    assignment, a keyword, ``setdefault``/``putenv``, or an ``X=Y`` string (unless the
    string is only tested for absence, ``"...=disabled" not in text``)."""
    tree = parsed(path)
    absent = {
        id(node.left)
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare) and any(isinstance(op, ast.NotIn) for op in node.ops)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "RAY_AUTH_MODE":
                    yield where(path, node), literal(value)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Subscript) and literal(target.slice) == "RAY_AUTH_MODE":
                    yield where(path, node), literal(node.value)
        elif isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "RAY_AUTH_MODE":
                    yield where(path, node), literal(kw.value)
            if node.args and literal(node.args[0]) == "RAY_AUTH_MODE" and len(node.args) > 1:
                yield where(path, node), literal(node.args[1])
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in absent
        ):
            for match in re.finditer(r"RAY_AUTH_MODE=([A-Za-z_]+)", node.value):
                yield where(path, node), match.group(1)


def literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return ast.unparse(node)


def test_checker_sees_auth_disabled(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\nenv = {'RAY_AUTH_MODE': 'disabled'}\nos.environ['RAY_AUTH_MODE'] = 'off'\n"
        "dict(RAY_AUTH_MODE='none')\nos.environ.setdefault('RAY_AUTH_MODE', 'x')\n"
        "cmd = 'RAY_AUTH_MODE=disabled ray start'\nassert 'RAY_AUTH_MODE=disabled' not in cmd\n"
    )
    values = [v for _, v in auth_settings_in_python(sample)]
    assert sorted(values) == ["disabled", "disabled", "none", "off", "x"]


def test_ray_token_auth_is_never_disabled():
    settings = [
        (place, value)
        for path in PYTHON
        if path != THIS_FILE
        for place, value in auth_settings_in_python(path)
    ]
    for path in repo_files(TEXT_SUFFIXES - {".py"}):
        text = path.read_text(encoding="utf-8", errors="replace")
        settings += [(str(path.relative_to(ROOT)), m.group(1)) for m in AUTH_IN_TEXT.finditer(text)]
    assert settings, "no RAY_AUTH_MODE setting found at all"
    bad = [f"{place}: RAY_AUTH_MODE={value}" for place, value in settings if value != "token"]
    assert not bad, bad


def secrets_in(value: Any, key: str) -> list[str]:
    if not isinstance(value, str):
        return []
    found = [name for name, pattern in TOKEN_FORMATS.items() if pattern.search(value)]
    if URL_PASSWORD.search(value):
        found.append("password in a URL")
    # References and file paths name where a secret lives, not the secret.
    literal = value and not value.startswith(("$", "~/", "/", "./"))
    if (
        CREDENTIAL_KEYS.search(key)
        and literal
        and not key.lower().endswith(("name", "_file", "path"))
    ):
        found.append(f"credential key {key!r} has a literal value")
    return found


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("tracking_uri", "https://user:secret@mlflow.example.com/"),
        ("api_key", "abc123"),
        ("note", "AKIAABCDEFGHIJKLMNOP"),
        ("hf", "hf_" + "a" * 34),
    ],
)
def test_secret_checker_sees_secrets(key, value):
    assert secrets_in(value, key)


def test_no_secrets_in_configs():
    paths = sorted((ROOT / "configs").rglob("*.y*ml")) + sorted((ROOT / "cluster").rglob("*.y*ml"))
    assert any(p.parent.name == "configs" for p in paths)
    found = [
        f"{path.relative_to(ROOT)}: {key}: {problem}"
        for path in paths
        for doc in yaml_documents(path)
        for key, value in walk(doc)
        for problem in secrets_in(value, key)
    ]
    # Comments too: a commented-out credential is still a leaked one.
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for name, pattern in [*TOKEN_FORMATS.items(), ("password in a URL", URL_PASSWORD)]:
                if pattern.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {name}")
    assert not found, found
