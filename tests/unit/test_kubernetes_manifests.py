"""deploy/kubernetes: every manifest loads, and the essentials issue 14 lists hold.

- API pods: on nodes running the Nitro Enclaves device plugin, requesting its resource
  (``aws.ec2.nitro/nitro_enclaves``) and hugepages enough for ``[nitro]``'s enclaves (requests
  equal to limits, with a memory request beside them, as Kubernetes requires); liveness on
  ``/healthz`` and readiness on ``/readyz`` over HTTPS on the port ``cape.toml`` sets;
- the node's settings come from the ConfigMap's ``cape.toml``, parsed here by Cape's own loader
  (:func:`cape.platform.config.load_settings`), so a renamed or unknown setting fails this test;
  every path it names is where a volume puts that file; secrets come from Secrets, mounted
  read-only, 0400;
- every container's ``cape …`` command is parsed by Cape's real CLI (an unknown flag fails);
- no Secret object and no secret value is committed; containers drop every capability, and
  run as non-root except the one that must be root (README.md says why);
- the key service (``cape kms serve``) has its Deployment, Service and volume;
- every object is valid against Kubernetes's own OpenAPI schema (``kubernetes-validate``,
  strict: a misspelt field fails).

:func:`problems` returns what is wrong with a set of manifests; the tests assert it is empty
for the committed ones and that it finds each kind of breakage in a broken copy.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import re
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Final

import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from cape.cli.app import app
from cape.errors import FormatError
from cape.platform.config import SETTINGS, load_settings
from cape.platform.serve import ServeConfig

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
DEVICE: Final = "aws.ec2.nitro/nitro_enclaves"
PLUGIN_LABEL: Final = ("aws-nitro-enclaves-k8s-dp", "enabled")
ROOT_CONTAINERS: Final = {("cape-api", "cape")}
"""Containers that run as uid 0, each with its reason in deploy/kubernetes/README.md."""
KEY_SERVICE_SETTINGS: Final = {"key_service_url", "key_service_pin", "key_service_token_file"}
"""The node's key-service settings (../shared interface of issue 14, built by `cape kms`)."""
KMS_SETTINGS: Final = {
    "listen",
    "data_dir",
    "database_url",
    "tls_cert",
    "tls_key",
    "node_token_file",
    "log_level",
}
"""``cape kms serve``'s settings (the interface of issue 14); its loader checks the values."""
_UNITS: Final = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "": 1}

Docs = dict[tuple[str, str], dict[str, Any]]


def load(directory: Path = KUBE) -> Docs:
    """Every object of every manifest, by (kind, name); the kustomization lists every file."""
    docs: Docs = {}
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            assert isinstance(doc, dict) and doc.get("kind"), f"{path.name}: not an object"
            name = doc["metadata"]["name"] if "metadata" in doc else path.stem
            assert (doc["kind"], name) not in docs, f"{path.name}: {doc['kind']} {name} twice"
            docs[(doc["kind"], name)] = doc
    return docs


def _bytes(quantity: object) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|)", str(quantity))
    assert match, f"not a binary quantity: {quantity!r}"
    return int(match.group(1)) * _UNITS[match.group(2)]


def _containers(deployment: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def _container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in _containers(deployment) if c["name"] == name)


def _mounts(deployment: dict[str, Any], container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Mount path -> (mount, volume) for ``container``."""
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    return {
        m["mountPath"]: {"mount": m, "volume": volumes[m["name"]]}
        for m in container.get("volumeMounts", [])
    }


def _file_source(mounts: dict[str, dict[str, Any]], path: str) -> tuple[str, str, str] | None:
    """(volume kind, object name, key) that provides the file at ``path``, if any."""
    target = PurePosixPath(path)
    for mount_path, found in mounts.items():
        mount, volume = found["mount"], found["volume"]
        base = PurePosixPath(mount_path)
        if "subPath" in mount:
            if target != base:
                continue
            relative = mount["subPath"]
        elif base in target.parents:
            relative = str(target.relative_to(base))
        else:
            continue
        for kind, field in (("secret", "secretName"), ("configMap", "name")):
            if kind in volume:
                items = {i["path"]: i["key"] for i in volume[kind].get("items", [])}
                key = items.get(relative, relative) if items else relative
                return kind, volume[kind][field], key
        return "emptyDir" if "emptyDir" in volume else "other", found["mount"]["name"], relative
    return None


def _cli(args: list[str], where: str) -> list[str]:
    """Parse a ``cape …`` command with Cape's own CLI (``--help`` added: parsed, not run)."""
    if args[:1] != ["cape"]:
        return [f"{where}: `{' '.join(args)}` is not a cape command"]
    reason = _cli_refusal(tuple(args[1:]))
    return [] if reason is None else [f"{where}: `{' '.join(args)}`: {reason}"]


@functools.cache
def _cli_refusal(args: tuple[str, ...]) -> str | None:
    result = CliRunner().invoke(app, [*args, "--help"])
    if result.exit_code == 0:
        return None
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())[-300:]


def _kms_loader() -> Callable[..., object] | None:
    """``cape kms serve``'s config loader (``cape.platform.kms_serve``), if this build has it."""
    try:
        module = importlib.import_module("cape.platform.kms_serve")
    except ImportError:
        return None
    loader = getattr(module, "load_kms_config", None)
    return loader if callable(loader) else None


@functools.cache
def _has_command(*words: str) -> bool:
    return CliRunner().invoke(app, [*words, "--help"]).exit_code == 0


def _node_settings(toml: str, tmp: Path) -> tuple[dict[str, Any], list[str]]:
    """The ConfigMap's cape.toml through Cape's loader (and ServeConfig)."""
    document = tomllib.loads(toml)
    pending = KEY_SERVICE_SETTINGS - set(SETTINGS)
    problems = []
    if pending:  # `cape kms serve` and these settings land with the key-service branch
        document = {k: v for k, v in document.items() if k not in pending}
        missing = KEY_SERVICE_SETTINGS - set(tomllib.loads(toml))
        problems += [f"cape.toml: no {name}" for name in sorted(missing)]
    path = tmp / "cape.toml"
    lines = [line for line in toml.splitlines() if line.split("=")[0].strip() not in pending]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        settings = load_settings(path, env={})
        ServeConfig(**settings)
    except (FormatError, TypeError, ValueError) as exc:
        return {}, [*problems, f"cape.toml: {exc}"]
    return {**document, **settings}, problems


@functools.cache
def _schema_problem(document: str) -> str | None:
    """One object (as JSON) against Kubernetes's own OpenAPI schema, strict (no unknown
    fields); cached, as the broken copies differ from the committed objects in one place."""
    doc = json.loads(document)
    try:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as exc:
        return str(exc).splitlines()[0]
    except (KeyError, kubernetes_validate.SchemaNotFoundError):
        return "not a Kubernetes object this schema knows"
    return None


def _schema_problems(docs: Docs) -> list[str]:
    found = []
    for (kind, name), doc in docs.items():
        if kind == "Kustomization":  # kustomize's file, not an API object
            continue
        problem = _schema_problem(json.dumps(doc, sort_keys=True))
        if problem is not None:
            found.append(f"{kind} {name}: {problem}")
    return found


def problems(docs: Docs, tmp: Path) -> list[str]:
    """Everything wrong with ``docs`` against the essentials (empty when all hold)."""
    found = _schema_problems(docs)
    kinds = {kind for kind, _ in docs}
    if "Secret" in kinds:
        found.append("a Secret object is committed: create Secrets with kubectl (README.md)")
    text = yaml.safe_dump_all(list(docs.values()))
    if re.search(r"-----BEGIN [A-Z ]*(PRIVATE KEY|CERTIFICATE)", text):
        found.append("key or certificate material is committed")
    if re.search(r"[a-z+]+://[^/\s:@\"']+:[^@\s\"']+@", text):
        found.append("a URL with a password is committed")
    missing = len(found)
    for required in [
        ("Deployment", "cape-api"),
        ("ConfigMap", "cape-api-config"),
        ("Service", "cape-api"),
        ("PodDisruptionBudget", "cape-api"),
        ("Deployment", "cape-kms"),
        ("Service", "cape-kms"),
        ("ConfigMap", "cape-kms-config"),
        ("PersistentVolumeClaim", "cape-kms-data"),
    ]:
        if required not in docs:
            found.append(f"no {required[0]} {required[1]}")
    if len(found) > missing:
        return found

    api = docs[("Deployment", "cape-api")]
    pod = api["spec"]["template"]["spec"]
    labels = api["spec"]["template"]["metadata"]["labels"]
    node = _container(api, "cape")
    settings, config_problems = _node_settings(
        docs[("ConfigMap", "cape-api-config")]["data"]["cape.toml"], tmp
    )
    found += config_problems
    if not settings:
        return found

    # Scheduling and resources.
    if pod.get("nodeSelector", {}).get(PLUGIN_LABEL[0]) != PLUGIN_LABEL[1]:
        found.append("cape-api: not restricted to nodes with the Nitro Enclaves device plugin")
    resources = node.get("resources", {})
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    if str(requests.get(DEVICE)) != "1" or str(limits.get(DEVICE)) != "1":
        found.append(f"cape-api: requests and limits must ask for one {DEVICE}")
    pages = sorted(k for k in {*requests, *limits} if k.startswith("hugepages-"))
    nitro = settings.get("nitro")
    if not pages:
        found.append("cape-api: no hugepages")
    for size in pages:
        if requests.get(size) != limits.get(size):
            found.append(f"cape-api: {size} request and limit differ (Kubernetes refuses it)")
    if pages and "memory" not in requests:
        found.append("cape-api: hugepages need a memory request beside them")
    if nitro is None:
        found.append("cape.toml: no [nitro] table (the pods request enclave resources)")
    elif pages:
        need = settings["enclaves"] * nitro.memory_mib * 2**20
        have = sum(_bytes(limits.get(size, 0)) for size in pages)
        if have < need:
            found.append(f"cape-api: {have} bytes of hugepages for enclaves needing {need}")

    # Probes: HTTPS on the port cape.toml sets.
    ports = {p["name"]: p["containerPort"] for p in node.get("ports", [])}
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        get = node.get(probe, {}).get("httpGet", {})
        port = ports.get(get.get("port"), get.get("port"))
        if (get.get("path"), get.get("scheme"), port) != (path, "HTTPS", settings["port"]):
            found.append(f"cape-api: {probe} must GET {path} over HTTPS on {settings['port']}")

    # The command, the configuration and every file it names.
    command = [*node.get("command", []), *node.get("args", [])]
    found += _cli(command, "cape-api")
    mounts = _mounts(api, node)
    config_path = command[command.index("--config") + 1] if "--config" in command else None
    if config_path is None or _file_source(mounts, config_path) != (
        "configMap",
        "cape-api-config",
        "cape.toml",
    ):
        found.append("cape-api: --config is not the ConfigMap's cape.toml")
    files = {
        "tls_cert": ("secret", "tls.crt"),
        "tls_key": ("secret", "tls.key"),
        "key_service_token_file": ("secret", "token"),
    }
    auth_dir = settings.get("auth_dir")
    expected = {name: str(settings[name]) for name in files if name in settings}
    if auth_dir is not None:
        expected["auth_dir"] = str(PurePosixPath(str(auth_dir), "auth", "signing.key"))
        files["auth_dir"] = ("secret", "signing.key")
    for name, path in expected.items():
        source = _file_source(mounts, path)
        if source is None or (source[0], source[2]) != files[name]:
            found.append(f"cape-api: {name} ({path}) is not a Secret's {files[name][1]}")
    if _file_source(mounts, str(settings["data_dir"]) + "/x") is None:
        found.append("cape-api: data_dir is not a mounted, writable volume")
    for env in node.get("env", []):
        name = env["name"].removeprefix("CAPE_").lower()
        if name not in SETTINGS:
            found.append(f"cape-api: {env['name']} is not a setting")
        if "value" in env and name == "database_url":
            found.append("cape-api: CAPE_DATABASE_URL must come from a Secret")
    for mount_path, mounted in mounts.items():
        if "secret" in mounted["volume"]:
            if not mounted["mount"].get("readOnly"):
                found.append(f"cape-api: Secret at {mount_path} is not mounted read-only")
            if mounted["volume"]["secret"].get("defaultMode") != 0o400:
                found.append(f"cape-api: Secret at {mount_path} is not mode 0400")

    # Who reaches the pods, and how many may go at once.
    for kind in ("Service", "PodDisruptionBudget"):
        selector = docs[(kind, "cape-api")]["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            found.append(f"{kind} cape-api does not select the API pods")

    # The key service.
    kms = docs[("Deployment", "cape-kms")]
    kms_node = _container(kms, "kms")
    kms_command = [*kms_node.get("command", []), *kms_node.get("args", [])]
    if _has_command("kms", "serve"):
        found += _cli(kms_command, "cape-kms")
    elif kms_command[:3] != ["cape", "kms", "serve"]:
        found.append("cape-kms: does not run `cape kms serve`")
    kms_text = docs[("ConfigMap", "cape-kms-config")]["data"]["kms.toml"]
    kms_toml = tomllib.loads(kms_text)
    found += [f"kms.toml: unknown setting {k}" for k in sorted(set(kms_toml) - KMS_SETTINGS)]
    loader = _kms_loader()
    if loader is not None:  # `cape kms serve`'s own loader, once it is in this build
        (tmp / "kms.toml").write_text(kms_text, encoding="utf-8")
        try:
            loader(tmp / "kms.toml", env={})
        except (FormatError, TypeError, ValueError) as exc:
            found.append(f"kms.toml: {exc}")
    kms_mounts = _mounts(kms, kms_node)
    data = kms_mounts.get(str(kms_toml.get("data_dir")), {}).get("volume", {})
    if data.get("persistentVolumeClaim", {}).get("claimName") != "cape-kms-data":
        found.append("cape-kms: data_dir is not on the PersistentVolumeClaim cape-kms-data")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = kms_node.get(probe, {}).get("httpGet", {})
        if (get.get("path"), get.get("scheme")) != (path, "HTTPS"):
            found.append(f"cape-kms: {probe} must GET {path} over HTTPS")

    # Least privilege in every pod.
    for (kind, name), doc in docs.items():
        if kind != "Deployment":
            continue
        pod_context = doc["spec"]["template"]["spec"].get("securityContext", {})
        for container in _containers(doc):
            context = {**pod_context, **container.get("securityContext", {})}
            where = f"{name}/{container['name']}"
            if context.get("allowPrivilegeEscalation") is not False:
                found.append(f"{where}: allowPrivilegeEscalation is not false")
            if context.get("capabilities", {}).get("drop") != ["ALL"]:
                found.append(f"{where}: does not drop every capability")
            if context.get("privileged"):
                found.append(f"{where}: privileged")
            root = (name, container["name"]) in ROOT_CONTAINERS
            if not root and context.get("runAsNonRoot") is not True:
                found.append(f"{where}: may run as root")
            if container.get("image") != "cape":
                found.append(f"{where}: image is not `cape` (set it in kustomization.yaml)")
    return found


def test_the_committed_manifests_have_the_essentials(tmp_path: Path) -> None:
    assert problems(load(), tmp_path) == []


def test_the_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text(encoding="utf-8"))
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    assert [image["name"] for image in kustomization["images"]] == ["cape"]


@pytest.mark.skipif(
    bool(KEY_SERVICE_SETTINGS - set(SETTINGS)),
    reason="the node's key_service_* settings come with `cape kms serve` (issue 14, t14k)",
)
def test_the_key_service_settings_are_ones_cape_serve_accepts(tmp_path: Path) -> None:
    toml = load()[("ConfigMap", "cape-api-config")]["data"]["cape.toml"]
    settings, found = _node_settings(toml, tmp_path)
    assert found == []
    assert set(settings) >= KEY_SERVICE_SETTINGS


def _api(docs: Docs) -> dict[str, Any]:
    return docs[("Deployment", "cape-api")]


def _node(docs: Docs) -> dict[str, Any]:
    return _container(_api(docs), "cape")


def _set_config(docs: Docs, edit: Callable[[str], str]) -> None:
    data = docs[("ConfigMap", "cape-api-config")]["data"]
    data["cape.toml"] = edit(data["cape.toml"])


BREAKAGES: Final[dict[str, tuple[Callable[[Docs], object], str]]] = {
    "no device": (
        lambda d: _node(d)["resources"]["limits"].pop(DEVICE),
        "requests and limits must ask for one aws.ec2.nitro/nitro_enclaves",
    ),
    "hugepage limit differs": (
        lambda d: _node(d)["resources"]["limits"].update({"hugepages-1Gi": "4Gi"}),
        "hugepages-1Gi request and limit differ",
    ),
    "too few hugepages": (
        lambda d: _set_config(d, lambda t: t.replace("enclaves = 1", "enclaves = 2")),
        "bytes of hugepages for enclaves needing",
    ),
    "no node selector": (
        lambda d: _api(d)["spec"]["template"]["spec"].pop("nodeSelector"),
        "not restricted to nodes with the Nitro Enclaves device plugin",
    ),
    "liveness over HTTP": (
        lambda d: _node(d)["livenessProbe"]["httpGet"].update({"scheme": "HTTP"}),
        "livenessProbe must GET /healthz over HTTPS",
    ),
    "readiness on /healthz": (
        lambda d: _node(d)["readinessProbe"]["httpGet"].update({"path": "/healthz"}),
        "readinessProbe must GET /readyz",
    ),
    "a renamed setting": (
        lambda d: _set_config(d, lambda t: t.replace("blob_store =", "blobstore =")),
        "unknown setting 'blobstore'",
    ),
    "a bad value": (
        lambda d: _set_config(d, lambda t: t.replace("port = 8443", "port = 99999")),
        "port must be an integer from 0 to 65535",
    ),
    "an unknown flag": (
        lambda d: _node(d)["command"].append("--enclave-count=2"),
        "No such option",
    ),
    "config from elsewhere": (
        lambda d: _node(d).update(command=["cape", "serve", "--config", "/tmp/cape.toml"]),
        "--config is not the ConfigMap's cape.toml",
    ),
    "a writable secret": (
        lambda d: next(m for m in _node(d)["volumeMounts"] if m["name"] == "tls").pop("readOnly"),
        "Secret at /etc/cape/tls is not mounted read-only",
    ),
    "TLS key not from a Secret": (
        lambda d: _set_config(d, lambda t: t.replace("/etc/cape/tls/tls.key", "/tmp/k.pem")),
        "tls_key (/tmp/k.pem) is not a Secret's tls.key",
    ),
    "a committed Secret": (
        lambda d: d.update(
            {
                ("Secret", "x"): {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": "x"},
                    "data": {"a": "Yg=="},
                }
            }
        ),
        "a Secret object is committed",
    ),
    "a password in a URL": (
        lambda d: _node(d)["env"].append(
            {"name": "CAPE_DATABASE_URL", "value": "postgresql+psycopg://cape:hunter2@db/cape"}
        ),
        "a URL with a password is committed",
    ),
    "a root sidecar": (
        lambda d: _container(_api(d), "vsock-proxy")["securityContext"].pop("runAsNonRoot"),
        "cape-api/vsock-proxy: may run as root",
    ),
    "a misspelt field": (
        lambda d: _node(d)["securityContext"].update(readOnlyRootFilesytem=True),
        "'readOnlyRootFilesytem' was unexpected",
    ),
    "a wrong type": (
        lambda d: _node(d)["ports"][0].update(containerPort="8443"),
        "Deployment cape-api: '8443' is not of type 'integer'",
    ),
    "no PDB": (
        lambda d: d.pop(("PodDisruptionBudget", "cape-api")),
        "no PodDisruptionBudget cape-api",
    ),
    "key service data not persistent": (
        lambda d: next(
            v
            for v in d[("Deployment", "cape-kms")]["spec"]["template"]["spec"]["volumes"]
            if v["name"] == "data"
        ).update(persistentVolumeClaim={"claimName": "elsewhere"}),
        "cape-kms: data_dir is not on the PersistentVolumeClaim",
    ),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_broken_manifest_is_caught(breakage: str, tmp_path: Path) -> None:
    docs = copy.deepcopy(load())
    edit, expected = BREAKAGES[breakage]
    edit(docs)
    found = problems(docs, tmp_path)
    assert any(expected in problem for problem in found), found
