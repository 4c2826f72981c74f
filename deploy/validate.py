"""Check KubeRay manifests (RayCluster, RayJob, and the PodMonitor that scrapes them) for this
project before `kubectl apply`.

    python -m deploy.validate deploy/kuberay/*.yaml        # exit 0: valid; 1: every problem printed

No cluster, Kubernetes or Docker needed. Each problem is printed as `FILE: FIELD: what is wrong`
(FILE#N for the N-th document of a multi-document file). Checked:

- structure, from KubeRay's ray.io/v1 CRDs (KubeRay 1.5.1+) and its admission rules
  (ray-operator/controllers/ray/utils/validation.go): apiVersion and kind, metadata.name length and
  DNS-1035 form, unknown fields (typos the API server would drop), worker groups (names, replica
  bounds, numOfHosts), rayStartParams as strings, Ray resources and labels (Ray's own label rules),
  Kubernetes quantities, GPU limits as whole numbers with requests == limits, the Ray container's
  cpu/memory limits, container ports (numbers, IANA names, unique), token auth against rayVersion,
  restartPolicy under autoscaler v2;
- a RayJob's entrypoint: `python -m cluster.train --config configs/<file> [--resume [auto]]
  [--overwrite] [overrides]`, loaded through the project's own config loader (an unknown or mistyped
  key is named), with `$VARS` filled by placeholders; then what a real run needs: no toy-world
  fallback (real reward models and prompts), every rewards.terms / run.out_of_domain.terms component
  declared by a configured reward model, every path absolute and on a volume that every pod mounts,
  the metrics exporter on a non-loopback host and a fixed port that is none of Ray's on the head
  (8080 is KubeRay's --metrics-export-port) and that the head container declares, and retries
  (backoffLimit > 0) only with `--resume auto` (and without --overwrite);
- a RayJob with a rayClusterSpec: each role (rollout, reward, learner; a worker group's
  `arcopo.io/role` label) fits its group at `replicas` pods, the custom resource rollout_gpu /
  reward_gpu / learner_gpu counts the group's GPUs one for one and each role asks for its own
  (rollout/rewards/learner.resources), and the whole cluster passes the job's own pre-flight check
  (cluster.placement.check_resources);
- a PodMonitor (monitoring.coreos.com/v1): known fields, a non-empty selector, endpoints by port name
  with a valid path and durations; and, checked against the RayClusters / RayJobs given with it,
  that its selector selects their head pod (with the labels KubeRay adds) and that its port name is
  a container port there, the one the RayJob's metrics.port listens on.

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
IANA_SVC_NAME = re.compile(r"^(?=.*[a-z])(?!.*--)[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # a container port's name
# The ports Ray itself listens on, on the head, by rayStartParams key, at KubeRay's defaults (KubeRay
# adds --metrics-export-port=8080 to every node unless rayStartParams names another): the job's own
# metrics.port must be none of these, nor in Ray's worker-port range (min/max-worker-port).
RAY_HEAD_PORTS = {
    "port": 6379,
    "dashboard-port": 8265,
    "ray-client-server-port": 10001,
    "metrics-export-port": 8080,
    "dashboard-agent-listen-port": 52365,
}
RAY_WORKER_PORTS = (10002, 19999)  # ray start's --min-worker-port / --max-worker-port defaults
LOOPBACK = re.compile(r"^(127\.[0-9.]+|localhost|::1|\[::1\])$")
# What KubeRay labels a Ray pod with (ray-operator/controllers/ray/common/pod.go, labelPod): these
# defaults, then the pod template's labels over them, except node-type, group and cluster.
KUBERAY_POD_LABELS = {
    "ray.io/is-ray-node": "yes",
    "app.kubernetes.io/name": "kuberay",
    "app.kubernetes.io/created-by": "kuberay-operator",
}
KUBERAY_FIXED_LABELS = ("ray.io/node-type", "ray.io/group", "ray.io/cluster")
# The components each kind of reward model declares (rewards/: videoalign.py, clip.py, toy.py), before
# its `prefix`: every rewards.terms and run.out_of_domain.terms name must be one of them.
REWARD_COMPONENTS = {
    "videoalign": ("vq", "mq", "ta", "overall", "vq_raw", "mq_raw", "ta_raw"),
    "clip": ("clip_score",),
    "pickscore": ("pickscore",),
    "toy": ("vq", "mq", "ta", "ood"),
}
PODMONITOR_SPEC_KEYS = {
    "attachMetadata",
    "bodySizeLimit",
    "convertClassicHistogramsToNHCB",
    "fallbackScrapeProtocol",
    "jobLabel",
    "keepDroppedTargets",
    "labelLimit",
    "labelNameLengthLimit",
    "labelValueLengthLimit",
    "namespaceSelector",
    "nativeHistogramBucketLimit",
    "nativeHistogramMinBucketFactor",
    "podMetricsEndpoints",
    "podTargetLabels",
    "sampleLimit",
    "scrapeClass",
    "scrapeClassicHistograms",
    "scrapeNativeHistograms",
    "scrapeProtocols",
    "selectMechanism",
    "selector",
    "targetLimit",
}
POD_ENDPOINT_KEYS = {
    "authorization",
    "basicAuth",
    "bearerTokenSecret",
    "enableHttp2",
    "filterRunning",
    "followRedirects",
    "honorLabels",
    "honorTimestamps",
    "interval",
    "metricRelabelings",
    "noProxy",
    "oauth2",
    "params",
    "path",
    "port",
    "portNumber",
    "proxyConnectHeader",
    "proxyFromEnvironment",
    "proxyUrl",
    "relabelings",
    "scheme",
    "scrapeTimeout",
    "targetPort",
    "tlsConfig",
    "trackTimestampsStaleness",
}
DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")


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


def _ports(ports, where: str, errors: list[str]) -> None:
    """A container's ports: numbers 1-65535, names IANA service names (what a PodMonitor names), both unique."""
    if not isinstance(ports, list):
        errors.append(f"{where}: must be a list")
        return
    names, numbers = set(), set()
    for i, p in enumerate(ports):
        pw = f"{where}[{i}]"
        number = p.get("containerPort") if isinstance(p, dict) else None
        if type(number) is not int or not 0 < number < 65536:
            errors.append(f"{pw}.containerPort: required, an integer in 1-65535")
        elif number in numbers:
            errors.append(f"{pw}.containerPort: duplicate {number}")
        numbers.add(number)
        name = p.get("name") if isinstance(p, dict) else None
        if name is None:
            continue
        if not isinstance(name, str) or len(name) > 15 or not IANA_SVC_NAME.match(name):
            errors.append(
                f"{pw}.name: {name!r} is not a port name (at most 15 of a-z, 0-9 and '-', with a letter, "
                "no '--', no '-' at either end)"
            )
        elif name in names:
            errors.append(f"{pw}.name: duplicate {name!r}")
        names.add(name)


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
        _ports(c.get("ports", []), f"{cw}.ports", errors)
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

# The options of `python -m cluster.train` besides --config: name -> whether it takes a value.
# `--resume` alone resumes; `--resume auto` resumes when a complete checkpoint exists and starts
# afresh otherwise (what a retried RayJob needs).
TRAIN_OPTIONS = {"--resume": ("auto",), "--overwrite": ()}


def split_entrypoint(entrypoint: str, env: dict[str, str] | None = None) -> tuple[Path, list[str], dict]:
    """(config path in this repository, overrides, options) of a `python -m cluster.train ...`
    entrypoint; options maps `resume` to None, True or "auto" and `overwrite` to a bool. `$VARS` are
    filled from `env` over PLACEHOLDER_ENV (the pod's secrets are not here)."""
    env = {**PLACEHOLDER_ENV, **(env or {})}
    words = shlex.split(entrypoint)
    words = [re.sub(r"\$\{?([A-Z_][A-Z0-9_]*)\}?", lambda m: env.get(m.group(1), m.group(0)), w) for w in words]
    if words[:3] != ["python", "-m", "cluster.train"]:
        raise ManifestError(f"the entrypoint must start with `python -m cluster.train`, got {words[:3]}")
    rest = words[3:]
    if "--config" not in rest or rest.index("--config") + 1 >= len(rest):
        raise ManifestError("the entrypoint has no --config")
    config, overrides, options = None, [], {"resume": None, "overwrite": False}
    i = 0
    while i < len(rest):
        word = rest[i]
        if word == "--config":
            config, i = rest[i + 1], i + 2
            continue
        if word.startswith("--") and "=" in word and word.split("=", 1)[0] in TRAIN_OPTIONS:
            option, value = word.split("=", 1)
            if value not in TRAIN_OPTIONS[option]:
                raise ManifestError(
                    f"the entrypoint's {option} takes {' or '.join(TRAIN_OPTIONS[option]) or 'no value'}"
                )
            options[option[2:]], i = value, i + 1
            continue
        if word.startswith("--"):
            if word not in TRAIN_OPTIONS:
                raise ManifestError(
                    f"the entrypoint's option {word} is not one of cluster.train's: --config, "
                    + ", ".join(TRAIN_OPTIONS)
                )
            values = TRAIN_OPTIONS[word]
            if values and i + 1 < len(rest) and rest[i + 1] in values:
                options[word[2:]], i = rest[i + 1], i + 2
            else:
                options[word[2:]], i = True, i + 1
            continue
        overrides.append(word)
        i += 1
    path = ROOT / config.removeprefix(IMAGE_ROOT + "/")
    if not (path.is_file() and path.parent == ROOT / "configs"):
        raise ManifestError(f"the entrypoint's config {config!r} is not a file in configs/")
    return path, overrides, options


def parse_entrypoint(entrypoint: str, env: dict[str, str] | None = None) -> tuple[Path, list[str]]:
    """(config path in this repository, overrides) of a `python -m cluster.train ...` entrypoint."""
    path, overrides, _ = split_entrypoint(entrypoint, env)
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


def _roles(config) -> dict[str, tuple[str, int, float, float, dict]]:
    """role -> (config section, actors, CPUs each, GPUs each, custom resources each)."""
    r, w, lr = config.rollout, config.rewards, config.learner
    return {
        "rollout": ("rollout", r.num_workers, r.num_cpus_per_worker, r.num_gpus_per_worker, dict(r.resources)),
        "reward": ("rewards", w.num_servers, w.num_cpus_per_server, w.num_gpus_per_server, dict(w.resources)),
        "learner": ("learner", lr.num_workers, lr.num_cpus_per_worker, lr.num_gpus_per_worker, dict(lr.resources)),
    }


def role_demand(config) -> dict[str, dict[str, float]]:
    """Per role: the CPUs, GPUs and custom resources (rollout/rewards/learner.resources) of all its actors."""
    out = {}
    for role, (_, n, cpus, gpus, custom) in _roles(config).items():
        out[role] = {"CPU": n * cpus, "GPU": n * gpus, **{k: n * v for k, v in custom.items()}}
    return out


def check_capacity(capacity: dict, config) -> list[str]:
    """Each role fits its own group (CPU, GPU and the custom resources it asks for), the custom resource
    counts that group's GPUs one for one, each role asks for its group's custom resource (or Ray may
    place it on another group's GPUs), and the whole cluster passes the job's own pre-flight check
    (cluster.placement.check_resources)."""
    from cluster.placement import PlacementError, check_resources

    errors = []
    roles = _roles(config)
    for role, need in role_demand(config).items():
        have = capacity.get(role)
        if have is None:
            errors.append(f"no worker group labelled {ROLE_LABEL}={role}")
            continue
        for resource, amount in need.items():
            if amount > have.get(resource, 0.0) + 1e-9:
                where = "" if resource in ("CPU", "GPU") else " (custom resource)"
                errors.append(
                    f"{role}: the job asks for {amount:g} {resource}{where}, its group has {have.get(resource, 0):g}"
                )
        custom = ROLE_RESOURCE[role]
        if need["GPU"] and have.get(custom) != have["GPU"]:
            errors.append(
                f"{role}: custom resource {custom} ({have.get(custom)}) must equal the group's GPUs ({have['GPU']:g})"
            )
        section, _, _, gpus, asked = roles[role]
        if have.get(custom) and gpus and asked.get(custom) != gpus:
            errors.append(
                f"{role}: {section}.resources asks for {asked.get(custom, 0):g} {custom} per actor, not its "
                f"{gpus:g} GPU(s): the group advertises {custom}, and without it Ray may place {role} actors "
                f"on another group's GPUs; set '{section}.resources={{{custom}: {gpus:g}}}'"
            )
    total: dict[str, float] = {}
    for have in capacity.values():
        for resource, amount in have.items():
            total[resource] = total.get(resource, 0.0) + amount
    try:
        check_resources(config, total)
    except PlacementError as exc:
        errors.append(str(exc))
    return errors


def declared_components(config) -> list[str]:
    """The reward components the job's reward models declare (REWARD_COMPONENTS, with each prefix)."""
    out = []
    for entry in config.rewards.models or [{"kind": "toy"}]:
        names = entry.get("components") or REWARD_COMPONENTS[entry["kind"]]
        out += [entry.get("prefix", "") + n for n in names]
    return out


def _entrypoint_paths(config) -> list[tuple[str, str]]:
    """(key, path) of every file or directory the job's roles read or write, as given."""
    m, ood = config.model, config.run.out_of_domain
    pairs = [
        ("model.self_forcing_checkpoint", m.self_forcing_checkpoint),
        ("model.diffusers_transformer", m.diffusers_transformer),
        ("model.vae", m.vae),
        ("model.text_encoder", m.text_encoder),
        ("model.tokenizer", m.tokenizer),
        ("rollout.prompts", config.rollout.prompts),
        ("run.out_of_domain.prompts", ood.prompts if ood else None),
        ("run.output_dir", config.run.output_dir),
    ]
    for i, entry in enumerate(config.rewards.models):
        pairs += [
            (f"rewards.models[{i}].{k}", entry.get(k)) for k in ("path", "base_model", "processor", "prompt_template")
        ]
    return [(k, str(v)) for k, v in pairs if v is not None]


def _head_container(spec: dict) -> dict:
    return spec["headGroupSpec"]["template"]["spec"]["containers"][0]


def _shared_mounts(spec: dict) -> list[str]:
    """Mount paths that the Ray container of every pod (head and each worker group) has."""
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    mounts = [
        {m.get("mountPath") for m in g["template"]["spec"]["containers"][0].get("volumeMounts", [])} for g in groups
    ]
    return sorted(set.intersection(*mounts) - {None}) if mounts else []


def _head_port_conflicts(spec: dict | None, port: int) -> list[str]:
    """Why `port` on the head is Ray's (or may be): Ray's own ports there, and its worker-port range."""
    params = (spec or {}).get("headGroupSpec", {}).get("rayStartParams") or {}
    ports = {k: int(params.get(k, v)) for k, v in RAY_HEAD_PORTS.items() if str(params.get(k, v)).isdigit()}
    ranges = ("min-worker-port", "max-worker-port")
    ports.update({k: int(v) for k, v in params.items() if k.endswith("-port") and k not in ranges and str(v).isdigit()})
    out = [f"--{k}={v}" for k, v in ports.items() if v == port]

    def bound(key: str, default: int) -> int:
        value = str(params.get(key, default))
        return int(value) if value.isdigit() else default

    lo, hi = bound(ranges[0], RAY_WORKER_PORTS[0]), bound(ranges[1], RAY_WORKER_PORTS[1])
    if lo <= port <= hi:
        out.append(f"Ray's worker ports {lo}-{hi}")
    return out


def check_job(spec: dict, config, options: dict) -> list[str]:
    """What a RayJob's entrypoint must get right on a cluster beyond a valid config: the real model with
    real reward models that declare every scored component, every path on a volume all pods mount,
    the metrics exporter reachable on the head's declared port and clear of Ray's ports, and retries
    that resume."""
    from common.config import toy_fallback_problems

    errors = [f"spec.entrypoint: {p}" for p in toy_fallback_problems(config)]
    declared = declared_components(config)
    ood = config.run.out_of_domain
    for key, terms in (("rewards.terms", config.rewards.terms), ("run.out_of_domain.terms", ood.terms if ood else [])):
        missing = [t.name for t in terms if t.name not in declared]
        if missing:
            errors.append(
                f"spec.entrypoint: {key} names {', '.join(missing)}, which no model of rewards.models declares "
                f"(declared: {', '.join(declared)}); the job would stop when its reward servers start"
            )
    cluster = spec.get("rayClusterSpec")
    shared = _shared_mounts(cluster) if cluster else []
    for key, path in _entrypoint_paths(config):
        if not path.startswith("/"):
            errors.append(
                f"spec.entrypoint: {key}: {path} is relative, so the job would look in {IMAGE_ROOT}/{path} inside "
                "the image (a placeholder of the config); give a path on the shared volume"
                + (f" ({', '.join(shared)})" if shared else "")
            )
        elif cluster and not any(path == m or path.startswith(m.rstrip("/") + "/") for m in shared):
            errors.append(
                f"spec.entrypoint: {key}: {path} is on no volume that every pod mounts "
                f"({', '.join(shared) or 'none'}): the roles on other pods would not find it"
            )
    host, port = config.metrics.host, config.metrics.port
    if LOOPBACK.match(host):
        errors.append(
            f"spec.entrypoint: metrics.host={host} is the head pod's loopback: nothing outside the pod can "
            "scrape the job's metrics; set metrics.host=0.0.0.0"
        )
    if port == 0:
        errors.append(
            "spec.entrypoint: metrics.port=0 picks a random port, which no container port or PodMonitor can "
            "name; set a fixed one (9464)"
        )
    else:
        for why in _head_port_conflicts(cluster, port):
            errors.append(
                f"spec.entrypoint: metrics.port={port} is Ray's on the head ({why}): the driver could not bind "
                "it; use another (the default 9464)"
            )
        if cluster:
            declared_ports = [p.get("containerPort") for p in _head_container(cluster).get("ports", [])]
            if port not in declared_ports:
                errors.append(
                    f"spec.rayClusterSpec.headGroupSpec: the Ray container declares no containerPort {port} "
                    "(the entrypoint's metrics.port), so no PodMonitor can find the job's metrics; add "
                    f"{{containerPort: {port}, name: arcopo-metrics}}"
                )
    retries = spec.get("backoffLimit", 0)
    if retries and options.get("resume") != "auto":
        errors.append(
            f"spec.backoffLimit: {retries} retries run the entrypoint again into the same run folder, which "
            "cluster.train refuses (or, with --resume alone and no checkpoint yet, starts over appending to the "
            "first attempt's metrics); add --resume auto to the entrypoint"
        )
    if retries and options.get("overwrite"):
        errors.append(
            f"spec.backoffLimit: {retries} retries with --overwrite would delete the failed attempt's checkpoints; "
            "drop --overwrite"
        )
    return errors


# == PodMonitor (Prometheus Operator) ================================================================


def _selects(selector: dict, labels: dict) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions) selects a pod with `labels`."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        present = key in labels
        if (
            (op == "In" and not (present and labels[key] in values))
            or (op == "NotIn" and present and labels[key] in values)
            or (op == "Exists" and not present)
            or (op == "DoesNotExist" and present)
        ):
            return False
    return True


def head_pod_labels(doc: dict) -> dict[str, str]:
    """The labels KubeRay gives the head pod of a RayCluster or RayJob (a RayJob's cluster name is
    generated, so ray.io/cluster is left out for it)."""
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    fixed = {"ray.io/node-type": "head", "ray.io/group": "headgroup"}
    if doc["kind"] == "RayCluster":
        fixed["ray.io/cluster"] = doc["metadata"]["name"]
    template = (spec["headGroupSpec"]["template"].get("metadata") or {}).get("labels") or {}
    user = {k: v for k, v in template.items() if k not in KUBERAY_FIXED_LABELS}
    return {**KUBERAY_POD_LABELS, **user, **fixed}


def validate_podmonitor(doc) -> list[str]:
    """Every problem the Prometheus Operator's PodMonitor CRD (monitoring.coreos.com/v1) would have, and
    selectors or endpoints that could not find a pod's metrics port by name."""
    if not isinstance(doc, dict):
        return ["the document must be a map"]
    errors = []
    if doc.get("apiVersion") != "monitoring.coreos.com/v1":
        errors.append(f"apiVersion: must be monitoring.coreos.com/v1, got {doc.get('apiVersion')!r}")
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or len(name) > 253 or not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", name):
        errors.append("metadata.name: required, a DNS-1123 subdomain")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return errors + ["spec: required"]
    for key in sorted(set(spec) - PODMONITOR_SPEC_KEYS):
        errors.append(f"spec.{key}: unknown field")
    selector = spec.get("selector")
    if not isinstance(selector, dict) or not (selector.get("matchLabels") or selector.get("matchExpressions")):
        errors.append("spec.selector: required, with matchLabels or matchExpressions (an empty one selects every pod)")
    elif not isinstance(selector.get("matchLabels", {}), dict) or not all(
        isinstance(v, str) for v in (selector.get("matchLabels") or {}).values()
    ):
        errors.append("spec.selector.matchLabels: must be a map of strings")
    endpoints = spec.get("podMetricsEndpoints")
    if not isinstance(endpoints, list) or not endpoints:
        return errors + ["spec.podMetricsEndpoints: at least one endpoint is required"]
    for i, e in enumerate(endpoints):
        ew = f"spec.podMetricsEndpoints[{i}]"
        if not isinstance(e, dict):
            errors.append(f"{ew}: must be a map")
            continue
        for key in sorted(set(e) - POD_ENDPOINT_KEYS):
            errors.append(f"{ew}.{key}: unknown field")
        port = e.get("port")
        if port is None and e.get("portNumber") is None:
            errors.append(f"{ew}.port: required (the name of the pod's container port to scrape)")
        elif port is not None and (not isinstance(port, str) or not IANA_SVC_NAME.match(port) or len(port) > 15):
            errors.append(f"{ew}.port: {port!r} is not a container port name")
        if "path" in e and (not isinstance(e["path"], str) or not e["path"].startswith("/")):
            errors.append(f"{ew}.path: must start with /")
        for key in ("interval", "scrapeTimeout"):
            if key in e and (not isinstance(e[key], str) or not e[key] or not DURATION.match(e[key])):
                errors.append(f"{ew}.{key}: {e[key]!r} is not a Prometheus duration (e.g. 15s)")
        if e.get("scheme", "http") not in ("http", "https"):
            errors.append(f"{ew}.scheme: http or https")
    return errors


def check_podmonitor_targets(monitor: dict, ray_docs: list[dict], configs: dict[int, object]) -> list[str]:
    """A PodMonitor against the RayClusters / RayJobs it is deployed with: its selector selects each one's
    head pod, each endpoint's port name is a container port there, and for a RayJob that port is the
    entrypoint's metrics.port (`configs`: id(doc) -> loaded config)."""
    errors = []
    selector = monitor["spec"]["selector"]
    for doc in ray_docs:
        what = f"{doc['kind']} {doc['metadata']['name']}"
        labels = head_pod_labels(doc)
        if not _selects(selector, labels):
            shown = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))
            errors.append(f"spec.selector: does not select the head pod of {what} (its labels: {shown})")
            continue
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        ports = {p.get("name"): p.get("containerPort") for p in _head_container(spec).get("ports", []) if p.get("name")}
        for i, e in enumerate(monitor["spec"]["podMetricsEndpoints"]):
            name = e.get("port")
            if name is None:
                continue
            if name not in ports:
                errors.append(
                    f"spec.podMetricsEndpoints[{i}].port: {name!r} is not a named container port of the head of "
                    f"{what} (its ports: {', '.join(f'{n} {p}' for n, p in ports.items()) or 'none'})"
                )
                continue
            config = configs.get(id(doc))
            if config is not None and ports[name] != config.metrics.port:
                errors.append(
                    f"spec.podMetricsEndpoints[{i}].port: {name!r} is port {ports[name]} on the head of {what}, "
                    f"but its entrypoint serves metrics on metrics.port={config.metrics.port}"
                )
    return errors


# == the command line ================================================================================

KINDS = ("RayCluster", "RayJob", "PodMonitor")


def _rayjob_problems(doc: dict) -> tuple[list[str], object]:
    """(every problem of a RayJob, its entrypoint's config or None)."""
    errors = validate_rayjob(doc)
    if errors:
        return errors, None
    from common.config import ConfigError

    spec = doc["spec"]
    try:
        _, _, options = split_entrypoint(spec["entrypoint"])
        config = load_entrypoint_config(spec["entrypoint"])
    except (ManifestError, ConfigError) as exc:
        # A ConfigError is "invalid configuration (FILE + overrides):" and one line per bad key.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        details = lines[1:] if len(lines) > 1 and lines[0].endswith(":") else lines
        return [f"spec.entrypoint: {line}" for line in details], None
    if "rayClusterSpec" in spec:
        errors += [f"spec.rayClusterSpec: {e}" for e in check_capacity(group_capacity(spec["rayClusterSpec"]), config)]
    errors += check_job(spec, config, options)
    return errors, config


def validate_documents(docs: list) -> list[list[str]]:
    """The problems of each document, by kind (RayCluster, RayJob: structure, then a RayJob's
    entrypoint, capacity and metrics; PodMonitor: structure), and then each PodMonitor against the
    structurally valid RayClusters and RayJobs among `docs` (the manifests deployed together)."""
    out, configs, ray_docs, monitors = [], {}, [], []
    for doc in docs:
        kind = doc.get("kind") if isinstance(doc, dict) else None
        if kind == "RayCluster":
            errors = validate_raycluster(doc)
        elif kind == "RayJob":
            errors, config = _rayjob_problems(doc)
            if config is not None:
                configs[id(doc)] = config
        elif kind == "PodMonitor":
            errors = validate_podmonitor(doc)
            if not errors:
                monitors.append(len(out))
        else:
            errors = [f"kind: {kind!r} is not checked here ({', '.join(KINDS[:-1])} or {KINDS[-1]})"]
        if (kind == "RayCluster" and not errors) or (
            kind == "RayJob" and not validate_rayjob(doc) and "rayClusterSpec" in doc["spec"]
        ):
            ray_docs.append(doc)  # structurally valid, with a cluster spec: what a PodMonitor is checked against
        out.append(errors)
    for i in monitors:
        out[i] += check_podmonitor_targets(docs[i], ray_docs, configs)
    return out


def validate_document(doc) -> list[str]:
    """Every problem with one manifest on its own (validate_documents of just this one)."""
    return validate_documents([doc])[0]


def _read(path: Path) -> tuple[list, list[str]]:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except OSError as exc:
        return [], [f"{path}: cannot read ({exc.strerror or exc})"]
    except yaml.YAMLError as exc:
        return [], [f"{path}: not YAML ({exc})"]
    return docs, [] if docs else [f"{path}: no document"]


def validate_files(paths: list[str | Path]) -> dict[Path, list[str]]:
    """Per file, every problem of its documents, validated together with the other files' (so that a
    PodMonitor is checked against the RayCluster / RayJob it is deployed with); each message is
    prefixed by the file (and `#N`, counted from 1, where the file holds more than one document)."""
    read = {Path(p): _read(Path(p)) for p in paths}
    docs = [(path, i, len(d), doc) for path, (d, _) in read.items() for i, doc in enumerate(d, 1)]
    results = validate_documents([doc for *_, doc in docs])
    out = {path: list(problems) for path, (_, problems) in read.items()}
    for (path, i, n, _), errors in zip(docs, results, strict=True):
        where = f"{path}#{i}" if n > 1 else str(path)
        out[path] += [f"{where}: {e}" for e in errors]
    return out


def validate_file(path: str | Path) -> list[str]:
    """`validate_files` of one file."""
    return validate_files([path])[Path(path)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.validate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", help="RayCluster / RayJob / PodMonitor YAML files, checked together")
    args = parser.parse_args(argv)
    results = validate_files(args.files)
    failed = 0
    for file in args.files:
        errors = results[Path(file)]
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
