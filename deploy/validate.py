"""Check KubeRay manifests (RayCluster, RayJob) for this project before `kubectl apply`.

    python -m deploy.validate deploy/kuberay/*.yaml        # exit 0: valid; 1: every problem printed

No cluster, Kubernetes or Docker needed. Each problem is printed as `FILE: FIELD: what is wrong`
(FILE#N for the N-th document of a multi-document file). Checked:

- structure, from KubeRay's ray.io/v1 CRDs (KubeRay 1.5+) and its admission rules
  (ray-operator/controllers/ray/utils/validation.go): apiVersion and kind, metadata.name length and
  DNS-1035 form, unknown fields (typos the API server would drop), worker groups (names, replica
  bounds, numOfHosts), rayStartParams as strings, Ray resources and labels (Ray's own label rules),
  Kubernetes quantities, GPU limits as whole numbers with requests == limits, the Ray container's
  cpu/memory limits, token auth against rayVersion, restartPolicy under autoscaler v2;
- a RayJob's entrypoint: `python -m cluster.train --config configs/<file> [overrides]`, loaded through
  the project's own config loader (an unknown or mistyped key is named), with `$VARS` filled by
  placeholders;
- a RayJob with a rayClusterSpec: each role (rollout, reward, learner; a worker group's
  `arcopo.io/role` label) fits its group at `replicas` pods, the custom resource rollout_gpu /
  reward_gpu / learner_gpu counts the group's GPUs one for one, and the whole cluster passes the
  job's own pre-flight check (cluster.placement.check_resources).

Not checked: anything only a live operator, scheduler or image can tell (image pulls, node
capacity, the container's own files).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
IMAGE_ROOT = "/app"  # where deploy/Dockerfile puts this repository
ROLE_LABEL = "arcopo.io/role"
ROLE_RESOURCE = {"rollout": "rollout_gpu", "reward": "reward_gpu", "learner": "learner_gpu"}
# Stand-ins for the pod's environment when an entrypoint's `$VARS` are expanded to load its config.
PLACEHOLDER_ENV = {"ARCOPO_REDIS_PASSWORD": "0123456789abcdef"}


# == structure: KubeRay v1 RayCluster / RayJob =======================================================

# Field names of ray.io/v1 (KubeRay 1.5+ CRDs); an unknown key is a typo that the API server would
# drop (or refuse under strict field validation), so it is an error here.
CLUSTER_SPEC_KEYS = {
    "authOptions",
    "autoscalerOptions",
    "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions",
    "headGroupSpec",
    "headServiceAnnotations",
    "historyServerOptions",
    "managedBy",
    "networkPolicy",
    "rayVersion",
    "suspend",
    "tlsOptions",
    "upgradeStrategy",
    "workerGroupSpecs",
}
HEAD_KEYS = {
    "enableIngress",
    "headService",
    "ingressOptions",
    "labels",
    "rayStartParams",
    "resources",
    "serviceType",
    "template",
}
WORKER_KEYS = {
    "groupName",
    "idleTimeoutSeconds",
    "labels",
    "maxReplicas",
    "minReplicas",
    "numOfHosts",
    "priority",
    "rayStartParams",
    "replicas",
    "resources",
    "scaleStrategy",
    "suspend",
    "template",
}
JOB_SPEC_KEYS = {
    "activeDeadlineSeconds",
    "backoffLimit",
    "clusterSelector",
    "deletionStrategy",
    "entrypoint",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "entrypointResources",
    "jobId",
    "managedBy",
    "metadata",
    "preRunningDeadlineSeconds",
    "rayClusterSpec",
    "runtimeEnvYAML",
    "shutdownAfterJobFinishes",
    "submissionMode",
    "submitterConfig",
    "submitterPodTemplate",
    "suspend",
    "ttlSecondsAfterFinished",
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
MAX_CLUSTER_NAME, MAX_JOB_NAME = 53, 47  # KubeRay's MaxRayClusterNameLength, MaxRayJobNameLength
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
K8S_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")
RAY_START_RESOURCE_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")


class ManifestError(ValueError):
    pass


def _quantity(value, where: str) -> float:
    """A Kubernetes quantity (int or string such as "64", "480Gi", "500m") as a number of units."""
    text = str(value)
    if isinstance(value, bool) or not QUANTITY.match(text):
        raise ManifestError(f"{where}: {value!r} is not a Kubernetes quantity")
    number, suffix = re.match(r"^([0-9.]+)(.*)$", text).groups()
    scale = {
        "": 1,
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "P": 1e15,
        "E": 1e18,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "Pi": 2**50,
        "Ei": 2**60,
    }[suffix]
    return float(number) * scale


def _labels(labels, where: str, errors: list[str]) -> None:
    from ray._private.label_utils import validate_label_key, validate_label_value

    if not isinstance(labels, dict):
        errors.append(f"{where}: must be a map of strings")
        return
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            errors.append(f"{where}.{key}: keys and values must be strings")
            continue
        if key.startswith("ray.io/"):
            errors.append(f"{where}.{key}: the ray.io/ prefix is reserved for Ray's own labels")
        if (why := validate_label_key(key)) is not None:
            errors.append(f"{where}.{key}: {why}")
        try:
            validate_label_value(value)
        except ValueError as exc:
            errors.append(f"{where}.{key}: {exc}")


def _group(group: dict, where: str, errors: list[str], keys: set[str], *, autoscaling: bool, v2: bool) -> None:
    if not isinstance(group, dict):
        errors.append(f"{where}: must be a map")
        return
    for key in sorted(set(group) - keys):
        errors.append(f"{where}.{key}: unknown field")
    params = group.get("rayStartParams", {})
    if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
        errors.append(f'{where}.rayStartParams: must be a map of strings (quote numbers: "1")')
        params = {}
    if "labels" in params:
        errors.append(f"{where}.rayStartParams.labels: not supported, use the group's labels field")
    resources = group.get("resources", {})
    if resources:
        if not isinstance(resources, dict) or not all(isinstance(v, str) for v in resources.values()):
            errors.append(f"{where}.resources: must be a map of strings")
        else:
            for name, value in resources.items():
                try:
                    _quantity(value, f"{where}.resources.{name}")
                except ManifestError as exc:
                    errors.append(str(exc))
        if any(params.get(k) for k in RAY_START_RESOURCE_PARAMS):
            errors.append(f"{where}: resources set both in rayStartParams and in the resources field")
    if "labels" in group:
        _labels(group["labels"], f"{where}.labels", errors)

    template = group.get("template")
    pod = template.get("spec") if isinstance(template, dict) else None
    if not isinstance(pod, dict):
        errors.append(f"{where}.template.spec: required")
        return
    containers = pod.get("containers")
    if not isinstance(containers, list) or not containers:
        errors.append(f"{where}.template.spec.containers: at least one container is required")
        return
    names = set()
    for i, c in enumerate(containers):
        cw = f"{where}.template.spec.containers[{i}]"
        if not isinstance(c, dict):
            errors.append(f"{cw}: must be a map")
            continue
        if not isinstance(c.get("name"), str) or not DNS1123.match(c["name"]):
            errors.append(f"{cw}.name: required, a DNS-1123 label")
        elif c["name"] in names:
            errors.append(f"{cw}.name: duplicate container name {c['name']!r}")
        names.add(c.get("name"))
        if not isinstance(c.get("image"), str) or not c["image"].strip():
            errors.append(f"{cw}.image: required")
    ray = containers[0]  # KubeRay's RayContainerIndex
    limits = (ray.get("resources") or {}).get("limits") or {}
    requests = (ray.get("resources") or {}).get("requests") or {}
    for key in ("cpu", "memory"):
        if key not in limits:
            errors.append(f"{where}: the Ray container needs resources.limits.{key} (Ray sizes itself from it)")
    for key, value in {**limits, **{f"requests.{k}": v for k, v in requests.items()}}.items():
        try:
            _quantity(value, f"{where}: resources {key}")
        except ManifestError as exc:
            errors.append(str(exc))
    for key in limits:
        if "/" in key and key in requests and str(requests[key]) != str(limits[key]):
            errors.append(f"{where}: extended resource {key} must have requests == limits")
    if "nvidia.com/gpu" in limits:
        gpus = str(limits["nvidia.com/gpu"])
        if not gpus.isdigit():
            errors.append(f"{where}: nvidia.com/gpu must be a whole number, got {gpus!r}")
    if v2 and pod.get("restartPolicy") not in (None, "", "Never"):
        errors.append(f"{where}: restartPolicy must be Never or unset with autoscaler v2")


def validate_cluster_spec(spec, where: str = "spec") -> list[str]:
    """Every problem KubeRay (CRD schema + admission rules) or Ray would have with this RayClusterSpec."""
    errors: list[str] = []
    if not isinstance(spec, dict):
        return [f"{where}: must be a map"]
    for key in sorted(set(spec) - CLUSTER_SPEC_KEYS):
        errors.append(f"{where}.{key}: unknown field")
    version = spec.get("rayVersion")
    if not isinstance(version, str) or not re.match(r"^\d+\.\d+\.\d+$", version):
        errors.append(f'{where}.rayVersion: required here, e.g. "2.60.0"')
        version = None
    auth = spec.get("authOptions")
    if auth is not None:
        mode = auth.get("mode") if isinstance(auth, dict) else None
        if mode not in ("disabled", "token"):
            errors.append(f"{where}.authOptions.mode: must be 'disabled' or 'token'")
        if mode == "token" and version and tuple(map(int, version.split("."))) < (2, 52, 0):
            errors.append(f"{where}.authOptions.mode=token needs rayVersion >= 2.52.0")
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    v2 = autoscaling and (spec.get("autoscalerOptions") or {}).get("version") == "v2"
    if not isinstance(spec.get("headGroupSpec"), dict):
        errors.append(f"{where}.headGroupSpec: required")
    else:
        _group(spec["headGroupSpec"], f"{where}.headGroupSpec", errors, HEAD_KEYS, autoscaling=autoscaling, v2=v2)
    groups = spec.get("workerGroupSpecs", [])
    if not isinstance(groups, list):
        return errors + [f"{where}.workerGroupSpecs: must be a list"]
    seen = set()
    for i, g in enumerate(groups):
        gw = f"{where}.workerGroupSpecs[{i}]"
        if not isinstance(g, dict):
            errors.append(f"{gw}: must be a map")
            continue
        name = g.get("groupName")
        if not isinstance(name, str) or not DNS1123.match(name):
            errors.append(f"{gw}.groupName: required, a DNS-1123 label")
        elif name in seen:
            errors.append(f"{gw}.groupName: duplicate {name!r}")
        seen.add(name)
        counts = {}
        for key in ("replicas", "minReplicas", "maxReplicas", "numOfHosts"):
            value = g.get(key)
            if value is not None and (type(value) is not int or value < 0):
                errors.append(f"{gw}.{key}: must be a non-negative integer, got {value!r}")
            elif value is not None:
                counts[key] = value
        for key in ("minReplicas", "maxReplicas"):  # required by the v1 CRD
            if key not in g:
                errors.append(f"{gw}.{key}: required")
        lo, hi = counts.get("minReplicas"), counts.get("maxReplicas")
        if lo is not None and hi is not None and lo > hi:
            errors.append(f"{gw}: minReplicas {lo} > maxReplicas {hi}")
        n = counts.get("replicas")
        if n is not None and lo is not None and hi is not None and not lo <= n <= hi:
            errors.append(f"{gw}: replicas {n} outside [minReplicas {lo}, maxReplicas {hi}]")
        if g.get("numOfHosts", 1) == 0:
            errors.append(f"{gw}.numOfHosts: must be >= 1")
        if autoscaling and g.get("suspend"):
            errors.append(f"{gw}: cannot be suspended with the autoscaler enabled")
        _group(g, gw, errors, WORKER_KEYS, autoscaling=autoscaling, v2=v2)
    return errors


def _metadata(doc: dict, kind: str, max_len: int) -> list[str]:
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not name:
        return ["metadata.name: required"]
    errors = []
    if len(name) > max_len:
        errors.append(f"metadata.name: a {kind} name has at most {max_len} characters")
    if not DNS1035.match(name):
        errors.append(f"metadata.name: {name!r} is not a DNS-1035 label")
    return errors


def _header(doc: dict, kind: str, max_name_len: int) -> list[str]:
    """apiVersion, kind and metadata.name, as every KubeRay document has them."""
    errors = []
    if doc.get("apiVersion") != "ray.io/v1":
        errors.append(f"apiVersion: must be ray.io/v1, got {doc.get('apiVersion')!r}")
    if doc.get("kind") != kind:
        errors.append(f"kind: must be {kind}, got {doc.get('kind')!r}")
    return errors + _metadata(doc, kind, max_name_len)


def validate_raycluster(doc) -> list[str]:
    if not isinstance(doc, dict):
        return ["the document must be a map"]
    return _header(doc, "RayCluster", MAX_CLUSTER_NAME) + validate_cluster_spec(doc.get("spec"))


def validate_rayjob(doc) -> list[str]:
    if not isinstance(doc, dict):
        return ["the document must be a map"]
    errors = _header(doc, "RayJob", MAX_JOB_NAME)
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return errors + ["spec: required"]
    for key in sorted(set(spec) - JOB_SPEC_KEYS):
        errors.append(f"spec.{key}: unknown field")
    if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
        errors.append("spec.entrypoint: required")
    if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
        errors.append(f"spec.submissionMode: one of {sorted(SUBMISSION_MODES)}")
    for key in ("ttlSecondsAfterFinished", "backoffLimit"):
        if key in spec and (type(spec[key]) is not int or spec[key] < 0):
            errors.append(f"spec.{key}: must be a non-negative integer")
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        errors.append("spec.suspend needs shutdownAfterJobFinishes")
    if "runtimeEnvYAML" in spec:
        try:
            env = yaml.safe_load(spec["runtimeEnvYAML"])
            if not isinstance(env, dict):
                errors.append("spec.runtimeEnvYAML: must be a YAML map")
        except yaml.YAMLError as exc:
            errors.append(f"spec.runtimeEnvYAML: not YAML ({exc})")
    if "rayClusterSpec" in spec:
        errors += validate_cluster_spec(spec["rayClusterSpec"], "spec.rayClusterSpec")
    elif not spec.get("clusterSelector"):
        errors.append("spec: one of rayClusterSpec or clusterSelector is required")
    return errors


# == entrypoints and capacity ========================================================================


def parse_entrypoint(entrypoint: str, env: dict[str, str] | None = None) -> tuple[Path, list[str]]:
    """(config path in this repository, overrides) of a `python -m cluster.train ...` entrypoint.
    `$VARS` are filled from `env` over PLACEHOLDER_ENV (the pod's secrets are not here)."""
    env = {**PLACEHOLDER_ENV, **(env or {})}
    words = shlex.split(entrypoint)
    words = [re.sub(r"\$\{?([A-Z_][A-Z0-9_]*)\}?", lambda m: env.get(m.group(1), m.group(0)), w) for w in words]
    if words[:3] != ["python", "-m", "cluster.train"]:
        raise ManifestError(f"the entrypoint must start with `python -m cluster.train`, got {words[:3]}")
    rest = words[3:]
    if "--config" not in rest or rest.index("--config") + 1 >= len(rest):
        raise ManifestError("the entrypoint has no --config")
    at = rest.index("--config")
    config = rest[at + 1]
    overrides = [w for i, w in enumerate(rest) if i not in (at, at + 1) and not w.startswith("--")]
    path = ROOT / config.removeprefix(IMAGE_ROOT + "/")
    if not (path.is_file() and path.parent == ROOT / "configs"):
        raise ManifestError(f"the entrypoint's config {config!r} is not a file in configs/")
    return path, overrides


def load_entrypoint_config(entrypoint: str):
    from common.config import load_config

    path, overrides = parse_entrypoint(entrypoint)
    return load_config(path, overrides)  # raises ConfigError naming the bad key


def group_capacity(spec: dict) -> dict[str, dict[str, float]]:
    """Per worker group (by its arcopo.io/role label): CPU, GPU and custom resources at `replicas` pods."""
    out = {}
    for g in spec["workerGroupSpecs"]:
        role = (g.get("labels") or {}).get(ROLE_LABEL, g["groupName"])
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        pods = g.get("replicas", g["minReplicas"]) * g.get("numOfHosts", 1)
        res = {"CPU": _quantity(limits["cpu"], "cpu"), "GPU": float(limits.get("nvidia.com/gpu", 0))}
        res.update({k: _quantity(v, k) for k, v in (g.get("resources") or {}).items()})
        out[role] = {k: v * pods for k, v in res.items()}
    return out


def role_demand(config) -> dict[str, dict[str, float]]:
    r, w, lr = config.rollout, config.rewards, config.learner
    return {
        "rollout": {"CPU": r.num_workers * r.num_cpus_per_worker, "GPU": r.num_workers * r.num_gpus_per_worker},
        "reward": {"CPU": w.num_servers * w.num_cpus_per_server, "GPU": w.num_servers * w.num_gpus_per_server},
        "learner": {"CPU": lr.num_workers * lr.num_cpus_per_worker, "GPU": lr.num_workers * lr.num_gpus_per_worker},
    }


def check_capacity(capacity: dict, config) -> list[str]:
    """Each role fits its own group, the custom resource counts that group's GPUs one for one, and the
    whole cluster passes the job's own pre-flight check (cluster.placement.check_resources)."""
    from cluster.placement import PlacementError, check_resources

    errors = []
    for role, need in role_demand(config).items():
        have = capacity.get(role)
        if have is None:
            errors.append(f"no worker group labelled {ROLE_LABEL}={role}")
            continue
        for resource in ("CPU", "GPU"):
            if need[resource] > have[resource] + 1e-9:
                errors.append(
                    f"{role}: the job asks for {need[resource]:g} {resource}, its group has {have[resource]:g}"
                )
        if need["GPU"] and have.get(ROLE_RESOURCE[role]) != have["GPU"]:
            errors.append(
                f"{role}: custom resource {ROLE_RESOURCE[role]} ({have.get(ROLE_RESOURCE[role])}) must equal "
                f"the group's GPUs ({have['GPU']:g})"
            )
    total = {k: sum(c.get(k, 0) for c in capacity.values()) for k in ("CPU", "GPU")}
    try:
        check_resources(config, total)
    except PlacementError as exc:
        errors.append(str(exc))
    return errors


# == the command line ================================================================================


def validate_document(doc) -> list[str]:
    """Every problem with one manifest: its structure by kind, then, for a structurally valid RayJob,
    its entrypoint's config and (with a rayClusterSpec) whether its groups hold the job."""
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if kind == "RayCluster":
        return validate_raycluster(doc)
    if kind != "RayJob":
        return [f"kind: {kind!r} is not checked here (RayCluster or RayJob)"]
    errors = validate_rayjob(doc)
    if errors:
        return errors
    from common.config import ConfigError

    spec = doc["spec"]
    try:
        config = load_entrypoint_config(spec["entrypoint"])
    except (ManifestError, ConfigError) as exc:
        # A ConfigError is "invalid configuration (FILE + overrides):" and one line per bad key.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        details = lines[1:] if len(lines) > 1 and lines[0].endswith(":") else lines
        return [f"spec.entrypoint: {line}" for line in details]
    if "rayClusterSpec" in spec:
        errors += [f"spec.rayClusterSpec: {e}" for e in check_capacity(group_capacity(spec["rayClusterSpec"]), config)]
    return errors


def validate_file(path: str | Path) -> list[str]:
    """`validate_document` over every document of a YAML file, each message prefixed by the file
    (and `#N`, counted from 1, where the file holds more than one document)."""
    path = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except OSError as exc:
        return [f"{path}: cannot read ({exc.strerror or exc})"]
    except yaml.YAMLError as exc:
        return [f"{path}: not YAML ({exc})"]
    if not docs:
        return [f"{path}: no document"]
    out = []
    for i, doc in enumerate(docs, 1):
        where = f"{path}#{i}" if len(docs) > 1 else str(path)
        out += [f"{where}: {e}" for e in validate_document(doc)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.validate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", help="RayCluster / RayJob YAML files")
    args = parser.parse_args(argv)
    failed = 0
    for file in args.files:
        errors = validate_file(file)
        for e in errors:
            print(e, file=sys.stderr)
        if errors:
            failed += 1
        else:
            print(f"{file}: ok")
    if failed:
        print(f"{failed} of {len(args.files)} file(s) invalid", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
