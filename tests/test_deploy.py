"""The deployment files in deploy/: KubeRay manifests (and the PodMonitor that scrapes the job), the
cluster-launcher YAML, the Ray runtime env, the Dockerfile, and the Redis sizing formula of
docs/redis.md against a real redis-server.

No cluster, no Docker and no Kubernetes are needed: the KubeRay manifests go through deploy/validate.py
(`python -m deploy.validate FILE...`, a structural validator written from KubeRay's v1 CRD and its
admission rules, ray-operator/controllers/ray/utils/validation.go, plus the entrypoint, real-config,
metrics-port and capacity checks, and the PodMonitor against the manifests), the launcher YAML
through Ray's own JSON schema and `validate_config`, the runtime env through `ray.runtime_env.RuntimeEnv`,
and every entrypoint through the project's own config loader.
Each validator is shown to reject broken input (the `test_*_rejects_*` tests).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import sys
import time
import tomllib
import uuid
from pathlib import Path

import pytest
import yaml

from deploy.validate import (
    IMAGE_ROOT,
    REWARD_COMPONENTS,
    ROLE_LABEL,
    ROLE_RESOURCE,
    ManifestError,
    check_capacity,
    group_capacity,
    head_pod_labels,
    load_entrypoint_config,
    main,
    parse_entrypoint,
    role_demand,
    split_entrypoint,
    validate_file,
    validate_files,
    validate_podmonitor,
    validate_raycluster,
    validate_rayjob,
)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RAYCLUSTER = DEPLOY / "kuberay" / "raycluster.yaml"
RAYJOB = DEPLOY / "kuberay" / "rayjob.yaml"
PODMONITOR = DEPLOY / "kuberay" / "podmonitor.yaml"
REAL_CONFIG = ROOT / "configs" / "self_forcing_wan1.3b.yaml"
LAUNCHER = DEPLOY / "cluster-launcher" / "aws.yaml"
RUNTIME_ENV = DEPLOY / "runtime_env.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
TORCH_PIN = "torch==2.13.0"


def load(path: Path):
    return yaml.safe_load(path.read_text())


def sizing():
    spec = importlib.util.spec_from_file_location("redis_sizing", DEPLOY / "redis_sizing.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["redis_sizing"] = module
    spec.loader.exec_module(module)
    return module


# == KubeRay: the real manifests ======================================================================


def test_raycluster_is_valid():
    assert validate_raycluster(load(RAYCLUSTER)) == []


def test_rayjob_is_valid():
    assert validate_rayjob(load(RAYJOB)) == []


def test_rayjob_carries_the_raycluster_spec_verbatim():
    assert load(RAYJOB)["spec"]["rayClusterSpec"] == load(RAYCLUSTER)["spec"]


def test_kuberay_has_one_worker_group_per_role_with_its_own_resource_and_label():
    import ray

    spec = load(RAYCLUSTER)["spec"]
    assert spec["rayVersion"] == ray.__version__  # the image's Ray (pyproject pins it) is the operator's
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"rollout", "reward", "learner"}
    images = set()
    for name, g in groups.items():
        assert g["labels"][ROLE_LABEL] == name
        gpus = g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        assert g["resources"] == {ROLE_RESOURCE[name]: gpus}
        images.add(g["template"]["spec"]["containers"][0]["image"])
    images.add(spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"])
    assert len(images) == 1, f"every pod should run the same image, got {images}"
    assert spec["headGroupSpec"]["resources"] == {"CPU": "0"}  # no actor on the head
    # Autoscaling can only add rollout pods: the other groups are fixed.
    assert [n for n, g in groups.items() if g["minReplicas"] < g["maxReplicas"]] == ["rollout"]


def test_rayjob_entrypoint_is_a_valid_config_that_fits_the_groups():
    doc = load(RAYJOB)
    config = load_entrypoint_config(doc["spec"]["entrypoint"])
    assert config.replay.redis_url.startswith("rediss://") and config.replay.redis_tls
    # The password is read on the head from the mounted Secret, never written in the manifest.
    assert config.replay.redis_password is None
    assert str(config.replay.redis_password_file) == "/etc/arcopo/redis/password"
    assert check_capacity(group_capacity(doc["spec"]["rayClusterSpec"]), config) == []
    # The GPUs match exactly: no group idles at its initial size.
    cap, need = group_capacity(doc["spec"]["rayClusterSpec"]), role_demand(config)
    assert {r: cap[r]["GPU"] for r in need} == {r: need[r]["GPU"] for r in need}


def test_rayjob_runtime_env_is_a_valid_ray_runtime_env(monkeypatch):
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(load(RAYJOB)["spec"]["runtimeEnvYAML"])
    assert env["working_dir"] == IMAGE_ROOT
    # /app is this repository inside the image; validate the same env against the checkout.
    monkeypatch.chdir(ROOT)
    RuntimeEnv(**{**env, "working_dir": str(ROOT)})
    assert env["env_vars"]["RAY_AUTH_MODE"] == load(RAYCLUSTER)["spec"]["authOptions"]["mode"]


def _head_ports(spec: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}


def test_rayjob_trains_the_real_config_with_its_reward_models_on_its_own_groups_and_resumes_its_retries():
    doc = load(RAYJOB)
    path, _, options = split_entrypoint(doc["spec"]["entrypoint"])
    config = load_entrypoint_config(doc["spec"]["entrypoint"])
    real = load(REAL_CONFIG)
    assert path == REAL_CONFIG and config.model.latent_space != "pixels"
    # The real config's reward models, every one of them (VideoAlign trained on, CLIP out of domain).
    assert [m["kind"] for m in config.rewards.models] == [m["kind"] for m in real["rewards"]["models"]]
    assert all(m["path"].startswith("/mnt/arcopo/") for m in config.rewards.models)
    # Each role asks for its own group's custom resource, one per GPU.
    assert config.rollout.resources == {"rollout_gpu": config.rollout.num_gpus_per_worker}
    assert config.rewards.resources == {"reward_gpu": config.rewards.num_gpus_per_server}
    assert config.learner.resources == {"learner_gpu": config.learner.num_gpus_per_worker}
    # A retry budget, and each retry continues the run instead of being refused its own run folder.
    assert doc["spec"]["backoffLimit"] > 0 and options == {"resume": "auto", "overwrite": False}


def test_the_metrics_port_is_declared_on_the_head_and_is_not_rays():
    from common.config import MetricsConfig

    doc = load(RAYJOB)
    config = load_entrypoint_config(doc["spec"]["entrypoint"])
    ports = _head_ports(doc["spec"]["rayClusterSpec"])
    monitor = load(PODMONITOR)
    name = monitor["spec"]["podMetricsEndpoints"][0]["port"]
    assert config.metrics.host == "0.0.0.0" and ports[name] == config.metrics.port == MetricsConfig().port
    # 8080 is what KubeRay gives Ray's own metrics agent on every node (--metrics-export-port).
    assert (
        config.metrics.port != 8080
        and "metrics-export-port" not in doc["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    )
    assert _head_ports(load(RAYCLUSTER)["spec"])[name] == config.metrics.port


def test_podmonitor_is_valid_and_selects_the_head_pods_of_both_manifests():
    monitor = load(PODMONITOR)
    assert validate_podmonitor(monitor) == []
    assert validate_files([RAYCLUSTER, RAYJOB, PODMONITOR]) == {RAYCLUSTER: [], RAYJOB: [], PODMONITOR: []}
    labels = head_pod_labels(load(RAYJOB))
    assert labels["ray.io/node-type"] == "head" and labels["app.kubernetes.io/name"] == "arcopo"
    # KubeRay keeps node-type, group and cluster for itself; a template label cannot change them.
    doc = load(RAYCLUSTER)
    doc["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]["ray.io/node-type"] = "worker"
    assert head_pod_labels(doc)["ray.io/node-type"] == "head" and head_pod_labels(doc)["ray.io/cluster"] == "arcopo"


def test_reward_component_table_matches_the_reward_models():
    from rewards.toy import TOY_REWARDS

    assert set(REWARD_COMPONENTS["toy"]) == set(TOY_REWARDS)
    source = (ROOT / "rewards" / "videoalign.py").read_text()
    declared = re.search(r"self\.components = \[prefix \+ c for c in (\([^)]*\))\]", source).group(1)
    assert tuple(yaml.safe_load(declared.replace("(", "[").replace(")", "]"))) == REWARD_COMPONENTS["videoalign"]
    clip = (ROOT / "rewards" / "clip.py").read_text()
    assert '("clip_score" if kind == "clip" else "pickscore")' in clip
    assert REWARD_COMPONENTS["clip"] == ("clip_score",) and REWARD_COMPONENTS["pickscore"] == ("pickscore",)


# == KubeRay: the validator rejects broken manifests ==================================================


def _mutate(path: str | list, value=None, delete: bool = False):
    """A copy-editing function: set (or delete) the value at a dotted path (a list for keys with dots)."""

    def apply(doc):
        node = doc
        keys = path.split(".") if isinstance(path, str) else list(path)
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node[key]
        last = keys[-1]
        if isinstance(node, list):
            last = int(last)
        if delete:
            del node[last]
        else:
            node[last] = value
        return doc

    return apply


_CONTAINER0 = ["spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources"]

BROKEN_CLUSTERS = {
    "old apiVersion": (_mutate("apiVersion", "ray.io/v1alpha1"), "apiVersion"),
    "wrong kind": (_mutate("kind", "RayService"), "kind"),
    "no name": (_mutate("metadata.name", delete=True), "metadata.name"),
    "name not DNS-1035": (_mutate("metadata.name", "ARCOPO_1"), "DNS-1035"),
    "no head": (_mutate("spec.headGroupSpec", delete=True), "headGroupSpec: required"),
    "head without containers": (_mutate("spec.headGroupSpec.template.spec.containers", []), "at least one container"),
    "no image": (_mutate("spec.workerGroupSpecs.0.template.spec.containers.0.image", delete=True), ".image: required"),
    "min > max": (_mutate("spec.workerGroupSpecs.0.minReplicas", 9), "minReplicas 9 > maxReplicas"),
    "replicas > max": (_mutate("spec.workerGroupSpecs.0.replicas", 5), "replicas 5 outside"),
    "negative replicas": (_mutate("spec.workerGroupSpecs.1.replicas", -1), "non-negative integer"),
    "no maxReplicas": (_mutate("spec.workerGroupSpecs.2.maxReplicas", delete=True), "maxReplicas: required"),
    "no groupName": (_mutate("spec.workerGroupSpecs.1.groupName", delete=True), "groupName: required"),
    "duplicate groupName": (_mutate("spec.workerGroupSpecs.1.groupName", "rollout"), "duplicate 'rollout'"),
    "unquoted rayStartParams": (_mutate("spec.workerGroupSpecs.0.rayStartParams", {"num-gpus": 8}), "map of strings"),
    "labels in rayStartParams": (
        _mutate("spec.workerGroupSpecs.0.rayStartParams", {"labels": "a=b"}),
        "rayStartParams.labels",
    ),
    "resources twice": (_mutate("spec.workerGroupSpecs.0.rayStartParams", {"num-gpus": "8"}), "both in rayStartParams"),
    "reserved label": (_mutate("spec.workerGroupSpecs.0.labels", {"ray.io/role": "rollout"}), "reserved"),
    "bad label value": (_mutate("spec.workerGroupSpecs.0.labels", {ROLE_LABEL: "roll out!"}), "Invalid label"),
    "fractional GPU limit": (_mutate(_CONTAINER0 + ["limits", "nvidia.com/gpu"], "0.5"), "whole number"),
    "GPU requests != limits": (_mutate(_CONTAINER0 + ["requests", "nvidia.com/gpu"], "4"), "requests == limits"),
    "no memory limit": (
        _mutate("spec.workerGroupSpecs.2.template.spec.containers.0.resources.limits.memory", delete=True),
        "limits.memory",
    ),
    "bad quantity": (
        _mutate("spec.workerGroupSpecs.2.template.spec.containers.0.resources.limits.memory", "lots"),
        "not a Kubernetes quantity",
    ),
    "typo in spec": (_mutate("spec.workerGroupSpec", []), "spec.workerGroupSpec: unknown field"),
    "typo in group": (_mutate("spec.workerGroupSpecs.0.maxReplica", 4), "maxReplica: unknown field"),
    "token auth on old Ray": (_mutate("spec.rayVersion", "2.40.0"), "needs rayVersion >= 2.52.0"),
    "bad auth mode": (_mutate("spec.authOptions", {"mode": "password"}), "authOptions.mode"),
    "restartPolicy with autoscaler v2": (
        _mutate("spec.workerGroupSpecs.0.template.spec.restartPolicy", "Always"),
        "restartPolicy",
    ),
    "port name over 15 characters": (
        _mutate("spec.headGroupSpec.template.spec.containers.0.ports.3.name", "arcopo-metrics-x"),
        "'arcopo-metrics-x' is not a port name",
    ),
    "duplicate container port": (
        _mutate("spec.headGroupSpec.template.spec.containers.0.ports.3.containerPort", 8265),
        "containerPort: duplicate 8265",
    ),
}


@pytest.mark.parametrize("name", sorted(BROKEN_CLUSTERS))
def test_validator_rejects_broken_raycluster(name):
    mutate, expected = BROKEN_CLUSTERS[name]
    errors = validate_raycluster(mutate(copy.deepcopy(load(RAYCLUSTER))))
    assert any(expected in e for e in errors), errors


BROKEN_JOBS = {
    "no entrypoint": (_mutate("spec.entrypoint", delete=True), "entrypoint: required"),
    "job name too long": (_mutate("metadata.name", "a" * 48), "at most 47"),
    "bad submission mode": (_mutate("spec.submissionMode", "Batch"), "submissionMode"),
    "runtime env not YAML": (_mutate("spec.runtimeEnvYAML", "working_dir: [unclosed"), "not YAML"),
    "negative ttl": (_mutate("spec.ttlSecondsAfterFinished", -1), "ttlSecondsAfterFinished"),
    "no cluster": (_mutate("spec.rayClusterSpec", delete=True), "rayClusterSpec or clusterSelector"),
    "broken nested cluster": (_mutate("spec.rayClusterSpec.workerGroupSpecs.0.minReplicas", 7), "minReplicas 7 >"),
}


@pytest.mark.parametrize("name", sorted(BROKEN_JOBS))
def test_validator_rejects_broken_rayjob(name):
    mutate, expected = BROKEN_JOBS[name]
    errors = validate_rayjob(mutate(copy.deepcopy(load(RAYJOB))))
    assert any(expected in e for e in errors), errors


# == KubeRay: `python -m deploy.validate`, what a user runs on edited manifests ========================


def _append_to_entrypoint(words: str):
    def apply(doc):
        doc["spec"]["entrypoint"] += " " + words
        return doc

    return apply


def test_command_line_passes_the_shipped_manifests(capsys):
    assert main([str(RAYCLUSTER), str(RAYJOB), str(PODMONITOR)]) == 0
    out = capsys.readouterr()
    assert out.err == "" and out.out.splitlines() == [f"{RAYCLUSTER}: ok", f"{RAYJOB}: ok", f"{PODMONITOR}: ok"]


@pytest.mark.parametrize(
    "source, mutate, message",
    [
        (RAYCLUSTER, BROKEN_CLUSTERS["min > max"][0], "spec.workerGroupSpecs[0]: minReplicas 9 > maxReplicas 4"),
        (RAYCLUSTER, BROKEN_CLUSTERS["typo in group"][0], "spec.workerGroupSpecs[0].maxReplica: unknown field"),
        (RAYJOB, BROKEN_JOBS["broken nested cluster"][0], "spec.rayClusterSpec.workerGroupSpecs[0]: minReplicas 7 >"),
        # A structurally valid RayJob whose entrypoint's config is wrong, or does not fit its groups.
        (RAYJOB, _append_to_entrypoint("sampler.num_chunk=4"), "spec.entrypoint: sampler.num_chunk: unknown key"),
        (
            RAYJOB,
            _append_to_entrypoint("rollout.num_workers=17"),
            "spec.rayClusterSpec: rollout: the job asks for 17 GPU",
        ),
        (
            RAYJOB,
            _mutate("spec.entrypoint", "python -m cluster.train --config configs/nope.yaml"),
            "spec.entrypoint: the entrypoint's config 'configs/nope.yaml' is not a file in configs/",
        ),
    ],
)
def test_command_line_names_the_file_and_field_and_exits_1(tmp_path, capsys, source, mutate, message):
    good, edited = tmp_path / "good.yaml", tmp_path / "edited.yaml"
    good.write_text(source.read_text())
    edited.write_text(yaml.safe_dump(mutate(load(source))))
    assert main([str(good), str(edited)]) == 1
    out = capsys.readouterr()
    assert f"{edited}: {message}" in out.err, out.err
    assert str(good) not in out.err and out.out == f"{good}: ok\n"
    assert out.err.splitlines()[-1] == "1 of 2 file(s) invalid"


def test_command_line_numbers_documents_and_refuses_what_it_cannot_check(tmp_path):
    both = tmp_path / "both.yaml"  # kubectl's multi-document form: the second document is broken
    broken = BROKEN_CLUSTERS["no image"][0](load(RAYCLUSTER))
    both.write_text(yaml.safe_dump(load(RAYJOB)) + "---\n" + yaml.safe_dump(broken))
    errors = validate_file(both)
    assert errors and all(
        e.startswith(f"{both}#2: spec.workerGroupSpecs[0].template.spec.containers[0].image") for e in errors
    ), errors
    service = tmp_path / "service.yaml"
    service.write_text(yaml.safe_dump({**load(RAYCLUSTER), "kind": "RayService"}))
    assert validate_file(service) == [
        f"{service}: kind: 'RayService' is not checked here (RayCluster, RayJob or PodMonitor)"
    ]
    garbled = tmp_path / "garbled.yaml"
    garbled.write_text("spec: [unclosed\n")
    assert validate_file(garbled)[0].startswith(f"{garbled}: not YAML")
    assert validate_file(tmp_path / "missing.yaml")[0].startswith(f"{tmp_path / 'missing.yaml'}: cannot read")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert validate_file(empty) == [f"{empty}: no document"]


def test_python_dash_m_deploy_validate_runs_from_the_checkout(tmp_path):
    import subprocess

    edited = tmp_path / "raycluster.yaml"
    edited.write_text(yaml.safe_dump(BROKEN_CLUSTERS["bad quantity"][0](load(RAYCLUSTER))))
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.validate", str(RAYJOB), str(edited)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert f"{edited}: spec.workerGroupSpecs[2]: resources memory: 'lots' is not a Kubernetes quantity" in proc.stderr
    assert proc.stdout == f"{RAYJOB}: ok\n"


@pytest.mark.parametrize(
    "entrypoint, expected",
    [
        ("python -m cluster.serve --config configs/toy.yaml", "python -m cluster.train"),
        ("python -m cluster.train run.name=x", "no --config"),
        ("python -m cluster.train --config configs/nope.yaml", "not a file in configs/"),
        ("python -m cluster.train --config /app/README.md", "not a file in configs/"),
        ("python -m cluster.train --config configs/toy.yaml --resume=always", "--resume takes auto"),
        ("python -m cluster.train --config configs/toy.yaml --nope", "--nope is not one of cluster.train's"),
    ],
)
def test_entrypoint_check_rejects(entrypoint, expected):
    with pytest.raises(ManifestError, match=re.escape(expected)):
        parse_entrypoint(entrypoint)


@pytest.mark.parametrize(
    "options, expected",
    [
        ("--resume auto", {"resume": "auto", "overwrite": False}),
        ("--resume=auto", {"resume": "auto", "overwrite": False}),
        ("--resume", {"resume": True, "overwrite": False}),
        ("--overwrite", {"resume": None, "overwrite": True}),
        ("", {"resume": None, "overwrite": False}),
    ],
)
def test_entrypoint_options_are_read_as_cluster_train_reads_them(options, expected):
    path, overrides, got = split_entrypoint(f"python -m cluster.train --config configs/toy.yaml {options} run.name=x")
    assert (path.name, overrides, got) == ("toy.yaml", ["run.name=x"], expected)


def test_entrypoint_with_an_unknown_config_key_is_rejected():
    from common.config import ConfigError

    entrypoint = load(RAYJOB)["spec"]["entrypoint"] + " sampler.num_chunk=4"
    with pytest.raises(ConfigError, match="sampler.num_chunk: unknown key"):
        load_entrypoint_config(entrypoint)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("rollout.num_workers=17", "rollout: the job asks for 17 GPU"),
        ("learner.num_cpus_per_worker=9", "learner: the job asks for 72 CPU"),
        ("rewards.num_gpus_per_server=2", "reward: the job asks for 8 GPU"),
    ],
)
def test_capacity_check_rejects_a_job_its_groups_cannot_hold(override, expected):
    doc = load(RAYJOB)
    config = load_entrypoint_config(doc["spec"]["entrypoint"] + " " + override)
    errors = check_capacity(group_capacity(doc["spec"]["rayClusterSpec"]), config)
    assert any(expected in e for e in errors), errors


def _replace_in_entrypoint(old: str, new: str):
    def apply(doc):
        assert doc["spec"]["entrypoint"].count(old) == 1, old
        doc["spec"]["entrypoint"] = doc["spec"]["entrypoint"].replace(old, new)
        return doc

    return apply


def _only_videoalign(doc):
    """The entrypoint as it was: VideoAlign alone, so nothing declares the out-of-domain clip_score."""
    words = shlex.split(doc["spec"]["entrypoint"])
    models = next(w for w in words if w.startswith("rewards.models="))
    kept = yaml.safe_load(models.split("=", 1)[1])[:1]
    doc["spec"]["entrypoint"] += " " + shlex.quote("rewards.models=" + json.dumps(kept))
    return doc


# What a RayJob on the real config must get right beyond a loadable config: each variant breaks one
# thing and is refused with the message naming it (`python -m deploy.validate`, as a user runs it).
BROKEN_REAL_JOBS = {
    "toy rewards on the real model (no models)": (
        _append_to_entrypoint("rewards.models=[]"),
        "spec.entrypoint: rewards.models: empty, which means the toy world's rewards",
    ),
    "toy rewards on the real model (kind toy)": (
        _append_to_entrypoint("'rewards.models=[{kind: toy}]'"),
        "spec.entrypoint: rewards.models[0]: kind toy is the toy world's rewards",
    ),
    # With no phases the loader lets an empty rewards.models through; the job's pre-start check would not.
    "toy rewards on the real model, no phases": (
        _append_to_entrypoint("rewards.models=[] run.phases=[]"),
        "spec.entrypoint: rewards.models: empty, which means the toy world's rewards",
    ),
    "out-of-domain term that no reward model declares": (
        _only_videoalign,
        "spec.entrypoint: run.out_of_domain.terms names clip_score, which no model of rewards.models declares",
    ),
    "relative path (the config's placeholder)": (
        _append_to_entrypoint("run.out_of_domain.prompts=prompts/heldout.txt"),
        "spec.entrypoint: run.out_of_domain.prompts: prompts/heldout.txt is relative",
    ),
    "path on no volume every pod mounts": (
        _append_to_entrypoint("rollout.prompts=/etc/arcopo/redis-tls/train.txt"),
        "spec.entrypoint: rollout.prompts: /etc/arcopo/redis-tls/train.txt is on no volume that every pod mounts",
    ),
    "metrics on loopback": (
        _append_to_entrypoint("metrics.host=127.0.0.1"),
        "spec.entrypoint: metrics.host=127.0.0.1 is the head pod's loopback",
    ),
    "metrics on Ray's metrics-export-port": (
        _append_to_entrypoint("metrics.port=8080"),
        "spec.entrypoint: metrics.port=8080 is Ray's on the head (--metrics-export-port=8080)",
    ),
    "metrics on the dashboard's port": (
        _append_to_entrypoint("metrics.port=8265"),
        "spec.entrypoint: metrics.port=8265 is Ray's on the head (--dashboard-port=8265)",
    ),
    "metrics in Ray's worker ports": (
        _append_to_entrypoint("metrics.port=12000"),
        "spec.entrypoint: metrics.port=12000 is Ray's on the head (Ray's worker ports 10002-19999)",
    ),
    "metrics on a random port": (
        _append_to_entrypoint("metrics.port=0"),
        "spec.entrypoint: metrics.port=0 picks a random port",
    ),
    "metrics port the head does not declare": (
        _append_to_entrypoint("metrics.port=9465"),
        "spec.rayClusterSpec.headGroupSpec: the Ray container declares no containerPort 9465",
    ),
    "a role that does not ask for its group's resource": (
        _append_to_entrypoint("'rollout.resources={}'"),
        "spec.rayClusterSpec: rollout: rollout.resources asks for 0 rollout_gpu per actor, not its 1 GPU(s)",
    ),
    "a role that asks for another group's resource": (
        _append_to_entrypoint("'learner.resources={reward_gpu: 1}'"),
        "spec.rayClusterSpec: learner: the job asks for 8 reward_gpu (custom resource), its group has 0",
    ),
    "retries without --resume auto": (
        _replace_in_entrypoint(" --resume auto", ""),
        "spec.backoffLimit: 2 retries run the entrypoint again into the same run folder",
    ),
    "retries with --overwrite": (
        _append_to_entrypoint("--overwrite"),
        "spec.backoffLimit: 2 retries with --overwrite would delete the failed attempt's checkpoints",
    ),
    "an option cluster.train does not have": (
        _replace_in_entrypoint("--resume auto", "--resum auto"),
        "spec.entrypoint: the entrypoint's option --resum is not one of cluster.train's",
    ),
}


@pytest.mark.parametrize("name", sorted(BROKEN_REAL_JOBS))
def test_command_line_refuses_a_rayjob_that_would_not_run_the_real_config_well(tmp_path, capsys, name):
    mutate, message = BROKEN_REAL_JOBS[name]
    edited = tmp_path / "rayjob.yaml"
    edited.write_text(yaml.safe_dump(mutate(load(RAYJOB))))
    assert main([str(edited)]) == 1
    err = capsys.readouterr().err
    assert f"{edited}: {message}" in err, err


def test_without_retries_the_entrypoint_needs_no_resume():
    from deploy.validate import validate_document

    doc = _replace_in_entrypoint(" --resume auto", "")(load(RAYJOB))
    doc["spec"]["backoffLimit"] = 0
    assert validate_document(doc) == []


def _podmonitor_endpoint(key: str, value):
    return _mutate(["spec", "podMetricsEndpoints", 0, key], value)


BROKEN_PODMONITORS = {
    "port name that is no container port": (
        _podmonitor_endpoint("port", "metrics"),
        "spec.podMetricsEndpoints[0].port: 'metrics' is not a named container port of the head of RayJob "
        "arcopo-sf-align",
    ),
    "port name of another port": (
        _podmonitor_endpoint("port", "dashboard"),
        "spec.podMetricsEndpoints[0].port: 'dashboard' is port 8265 on the head of RayJob arcopo-sf-align, but "
        "its entrypoint serves metrics on metrics.port=9464",
    ),
    "selector that misses the head": (
        _mutate(["spec", "selector", "matchLabels", "ray.io/node-type"], "worker"),
        "spec.selector: does not select the head pod of RayCluster arcopo",
    ),
    "selector on KubeRay's own app label": (
        _mutate(["spec", "selector", "matchLabels", "app.kubernetes.io/name"], "kuberay"),
        "spec.selector: does not select the head pod of RayJob arcopo-sf-align",
    ),
    "empty selector": (_mutate("spec.selector", {}), "spec.selector: required"),
    "no endpoints": (_mutate("spec.podMetricsEndpoints", []), "spec.podMetricsEndpoints: at least one endpoint"),
    "typo in endpoint": (_podmonitor_endpoint("intervall", "15s"), "spec.podMetricsEndpoints[0].intervall: unknown"),
    "bad interval": (
        _podmonitor_endpoint("interval", "15 seconds"),
        "spec.podMetricsEndpoints[0].interval: '15 seconds' is not a Prometheus duration",
    ),
    "relative path": (_podmonitor_endpoint("path", "metrics"), "spec.podMetricsEndpoints[0].path: must start with /"),
    "wrong apiVersion": (
        _mutate("apiVersion", "monitoring.coreos.com/v1alpha1"),
        "apiVersion: must be monitoring.coreos.com/v1",
    ),
}


@pytest.mark.parametrize("name", sorted(BROKEN_PODMONITORS))
def test_command_line_refuses_a_podmonitor_that_would_not_find_the_job(tmp_path, capsys, name):
    mutate, message = BROKEN_PODMONITORS[name]
    edited = tmp_path / "podmonitor.yaml"
    edited.write_text(yaml.safe_dump(mutate(load(PODMONITOR))))
    assert main([str(RAYCLUSTER), str(RAYJOB), str(edited)]) == 1
    out = capsys.readouterr()
    assert f"{edited}: {message}" in out.err, out.err
    assert out.out == f"{RAYCLUSTER}: ok\n{RAYJOB}: ok\n"


def test_a_head_port_renamed_away_from_the_podmonitor_is_refused(tmp_path):
    renamed = tmp_path / "raycluster.yaml"
    doc = load(RAYCLUSTER)
    ports = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    next(p for p in ports if p["containerPort"] == 9464)["name"] = "job-metrics"
    renamed.write_text(yaml.safe_dump(doc))
    errors = validate_files([renamed, PODMONITOR])
    assert errors[renamed] == []  # valid by itself; wrong with the PodMonitor it is deployed with
    assert errors[PODMONITOR] == [
        f"{PODMONITOR}: spec.podMetricsEndpoints[0].port: 'arcopo-metrics' is not a named container port of the "
        "head of RayCluster arcopo (its ports: gcs-server 6379, dashboard 8265, client 10001, job-metrics 9464)"
    ]


# == cluster launcher: Ray's own schema ================================================================


def _ray_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert path.is_file(), f"Ray ships its cluster-launcher schema at {path}"
    return json.loads(path.read_text())


def test_cluster_launcher_yaml_passes_rays_schema_and_validate_config():
    jsonschema = pytest.importorskip("jsonschema")  # a dependency of ray; see docs/deploy.md
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = load(LAUNCHER)
    jsonschema.validate(config, _ray_schema())
    validate_config(fillout_defaults(copy.deepcopy(config)))  # head type exists, min_workers fit max_workers


def test_cluster_launcher_node_types_hold_the_rayjob_roles():
    config = load(LAUNCHER)
    types = config["available_node_types"]
    assert set(types) == {"head", "rollout", "reward", "learner"} and config["head_node_type"] == "head"
    assert types["head"]["resources"].get("CPU") == 0
    capacity = {}
    for name, t in types.items():
        if name == "head":
            continue
        assert t["labels"][ROLE_LABEL] == name
        capacity[name] = {k: float(v) * t["min_workers"] for k, v in t["resources"].items()}
    entrypoint = load(RAYJOB)["spec"]["entrypoint"]
    assert check_capacity(capacity, load_entrypoint_config(entrypoint)) == []
    assert all(
        "RAY_AUTH_MODE=token" in c
        for c in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]
    )


@pytest.mark.parametrize(
    "mutate",
    [
        _mutate("provider", {"region": "us-east-1"}),  # provider.type is required
        _mutate("available_node_types.rollout.resources", {"GPU": 0.5}),  # resources are integers
        _mutate("available_node_types.reward.node_config", delete=True),  # node_config is required
        _mutate("max_worker", 6),  # unknown top-level key
    ],
)
def test_cluster_launcher_schema_rejects_broken_yaml(mutate):
    jsonschema = pytest.importorskip("jsonschema")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(mutate(copy.deepcopy(load(LAUNCHER))), _ray_schema())


def test_cluster_launcher_rejects_unknown_head_type():
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = _mutate("head_node_type", "gpu-head")(copy.deepcopy(load(LAUNCHER)))
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(fillout_defaults(config))


# == runtime env ========================================================================================


def _pyproject_deps() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def test_runtime_env_is_a_valid_ray_runtime_env(monkeypatch):
    from ray.runtime_env import RuntimeEnv

    monkeypatch.chdir(ROOT)  # working_dir "." is the repository root, where `ray job submit` runs
    data = load(RUNTIME_ENV)
    env = RuntimeEnv(**data)
    assert env.working_dir() == "."
    assert all(isinstance(v, str) for v in env.env_vars().values())
    assert env.env_vars()["RAY_AUTH_MODE"] in ("token", "disabled")
    assert {".venv/", "runs/", ".git/"} <= set(data["excludes"])


def test_runtime_env_pip_is_pyproject_without_ray_and_pins_torch():
    packages = load(RUNTIME_ENV)["pip"]["packages"]
    assert TORCH_PIN in packages
    expected = [d for d in _pyproject_deps() if not re.match(r"^ray(\[|=|$)", d)]
    assert packages == expected, "deploy/runtime_env.yaml pip must list pyproject's dependencies minus ray"
    assert not any(p.startswith("ray") and not p.startswith("ray-") for p in packages)


@pytest.mark.parametrize(
    "broken",
    [
        {"pip": {"packages": ["torch==2.13.0"], "pip_chek": False}},  # unknown pip field
        {"pip": {"pip_check": False}},  # no packages
        {"env_vars": {"RAY_AUTH_MODE": 1}},  # env values are strings
        {"working_dir": "does/not/exist"},
    ],
)
def test_runtime_env_validation_rejects(broken, monkeypatch):
    from ray.runtime_env import RuntimeEnv

    monkeypatch.chdir(ROOT)
    with pytest.raises((ValueError, TypeError)):
        RuntimeEnv(**broken)


# == Dockerfile ==========================================================================================


def check_dockerfile(text: str) -> list[str]:
    """The torch pin on every install path, Python 3.11, and the build-time torch assertion."""
    errors = []
    lines, current = [], ""
    for raw in text.splitlines():  # join continuation lines
        line = raw.rstrip()
        if line.lstrip().startswith("#") and not current:
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            lines.append(current.strip())
            current = ""
    args = {}
    for line in lines:
        m = re.match(r"^ARG\s+(\w+)=(\S+)$", line)
        if m:
            args[m.group(1)] = m.group(2)
    pin = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    if args.get("TORCH_VERSION") != pin:
        errors.append(f"ARG TORCH_VERSION must default to constraints.txt's torch pin {pin}")
    base = next((line for line in lines if line.startswith("FROM ")), "")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), base)
    if not re.match(r"^FROM python:3\.11[-.]", base):
        errors.append(f"the base image must be python:3.11, got {base!r}")
    copied_constraints = False
    installs = 0
    for line in lines:
        if line.startswith("COPY") and "constraints.txt" in line:
            copied_constraints = True
        for command in re.split(r"&&|;", line):
            if re.search(r"\bpip3? install\b", command):
                installs += 1
                if "-c constraints.txt" not in command and "--constraint constraints.txt" not in command:
                    errors.append(f"pip install without -c constraints.txt: {command.strip()!r}")
                if not copied_constraints:
                    errors.append("constraints.txt is installed from before it is copied in")
    if installs == 0:
        errors.append("no pip install at all")
    if not any("torch.__version__" in line and "assert" in line for line in lines):
        errors.append("no build-time check that the installed torch is the pinned one")
    return errors


def test_dockerfile_pins_torch_on_every_install():
    assert check_dockerfile(DOCKERFILE.read_text()) == []
    assert TORCH_PIN in (ROOT / "constraints.txt").read_text().split()
    assert TORCH_PIN in _pyproject_deps()


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda t: t.replace("ARG TORCH_VERSION=2.13.0", "ARG TORCH_VERSION=2.12.0"), "TORCH_VERSION"),
        (lambda t: t.replace("pip install -c constraints.txt -r", "pip install -r"), "without -c constraints.txt"),
        (lambda t: t.replace("ARG PYTHON_VERSION=3.11", "ARG PYTHON_VERSION=3.12"), "python:3.11"),
        (lambda t: t + "\nRUN pip install torchvision\n", "without -c constraints.txt"),
        (lambda t: t.replace("assert v ==", "print(v) or"), "build-time check"),
    ],
)
def test_dockerfile_check_rejects(edit, expected):
    text = DOCKERFILE.read_text()
    edited = edit(text)
    assert edited != text
    assert any(expected in e for e in check_dockerfile(edited))


# == Redis sizing: the formula against a real redis-server ==============================================


def _rollout_group(seed: int, G: int, T: int, C: int, f: int, H: int, W: int, pivot: int, prompt: str):
    import torch

    from common.dataflow.records import RolloutGroup

    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    comps = {name: torch.rand(G, generator=gen) for name in ("vq", "mq", "ta")}
    return RolloutGroup(
        prompt=prompt,
        pivot=pivot,
        sigma=0.5,
        plan_seed=seed,
        fork_seed=seed + 1,
        policy_version=3,
        prefix_latents=r(1, C, pivot * f, H, W),
        pivot_inputs=r(G, T, C, f, H, W),
        pivot_predictions=r(G, T, C, f, H, W),
        pivot_latents=r(G, C, f, H, W),
        rewards=comps["vq"] + comps["ta"],
        reward_components=comps,
    )


@pytest.mark.parametrize(
    "dims, pivot",
    [((12, 4, 4, 3, 16, 24), 0), ((12, 4, 4, 3, 16, 24), 5), ((2, 1, 1, 1, 2, 2), 1), ((4, 2, 16, 1, 6, 10), 3)],
)
def test_record_bytes_formula_matches_the_codec(dims, pivot):
    rs = sizing()
    prompt = "a red circle moving left on a black background"
    g = _rollout_group(0, *dims, pivot=pivot, prompt=prompt)
    actual = len(g.to_bytes(key=b"k" * 32))
    predicted = rs.record_bytes(rs.GroupShape(*dims, pivot=pivot, components=3, prompt_chars=len(prompt)))
    assert abs(predicted - actual) <= 64, (predicted, actual)
    G, T, C, f, H, W = dims
    assert (
        rs.tensor_bytes(rs.GroupShape(*dims, pivot=pivot))
        == 4 * (2 * G * T * C * f * H * W + G * C * f * H * W + C * pivot * f * H * W) + 4 * G * 4
    )


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    from common.dataflow.redis_server import EmbeddedRedis

    with EmbeddedRedis(tmp_path_factory.mktemp("redis-sizing")) as server:
        client = server.client()
        # An AOF rewrite holds a second copy of every write made meanwhile (Redis < 7): keep it out of
        # the measurement (docs/redis.md sizes it separately).
        client.config_set("auto-aof-rewrite-percentage", 0)
        yield server, client
        client.close()


def _measure(server, client, groups, max_value_bytes: int) -> float:
    from common.dataflow.replay import ReplayBuffer

    def used() -> int:
        while client.info("persistence")["aof_rewrite_in_progress"]:
            time.sleep(0.05)
        return client.info("memory")["used_memory"]

    name = uuid.uuid4().hex[:8]
    before = used()
    buf = ReplayBuffer(server.url, name, key=b"k" * 32, capacity=10_000, max_value_bytes=max_value_bytes)
    for g in groups:
        buf.insert(g)
    assert buf.size() == len(groups)
    buf.close()  # frees the connection's query buffer, which is not the data
    time.sleep(0.05)
    return (used() - before) / len(groups)


SIZING_CASES = [  # G, T, C, f, H, W, pivot, max_value_bytes, items
    ((12, 4, 4, 3, 16, 24), 2, 256 << 10, 12),  # ~2 MB records in 256 KiB parts: +23% (size classes)
    ((12, 4, 4, 3, 16, 24), 2, (256 << 10) - 10, 12),  # 10 bytes less per part: +0.2%
    ((12, 4, 4, 3, 16, 24), 2, 4 << 20, 12),  # the default 4 MiB: one part each
    ((4, 2, 2, 1, 2, 2), 2, 4 << 20, 200),  # tiny records: the per-key overhead dominates
]


@pytest.mark.cluster
@pytest.mark.parametrize("dims, pivot, max_value_bytes, items", SIZING_CASES)
def test_redis_memory_formula_matches_a_real_redis(redis_server, dims, pivot, max_value_bytes, items):
    rs = sizing()
    server, client = redis_server
    prompt = "a red circle moving left on a black background"
    groups = [_rollout_group(i, *dims, pivot=pivot, prompt=prompt) for i in range(items)]
    record = len(groups[0].to_bytes(key=b"k" * 32))
    measured = _measure(server, client, groups, max_value_bytes)
    shape = rs.GroupShape(*dims, pivot=pivot, components=3, prompt_chars=len(prompt))
    predicted = rs.buffer_memory_bytes(items, shape, max_value_bytes) / items
    print(
        f"\n{dims} pivot {pivot}, parts of {max_value_bytes}: record {record} B, per item measured "
        f"{measured:.0f} B, predicted {predicted:.0f} B ({predicted / measured - 1:+.2%}), "
        f"overhead x{measured / record:.3f}"
    )
    assert abs(predicted - measured) <= 0.10 * measured


@pytest.mark.cluster
def test_part_size_one_byte_past_a_size_class_costs_a_quarter_more(redis_server):
    """The effect docs/redis.md warns about: a part of exactly 2^k bytes takes the next jemalloc class."""
    rs = sizing()
    server, client = redis_server
    if not str(client.info("memory").get("mem_allocator", "")).startswith("jemalloc"):
        pytest.skip("redis-server is not built with jemalloc")
    groups = [_rollout_group(i, 12, 4, 4, 3, 16, 24, pivot=2, prompt="p") for i in range(8)]
    record = len(groups[0].to_bytes(key=b"k" * 32))
    exact = _measure(server, client, groups, 256 << 10) / record
    fitted = _measure(server, client, groups, rs.best_max_value_bytes(256 << 10)) / record
    assert exact > 1.18 and fitted < 1.02, (exact, fitted)
    assert rs.best_max_value_bytes(4 << 20) == (4 << 20) - 10


def test_sizing_command_line_on_the_real_config():
    rs = sizing()
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert rs.main(["--config", str(ROOT / "configs" / "self_forcing_wan1.3b.yaml"), "--json"]) == 0
    report = json.loads(out.getvalue())
    # 480x832, 21 latent frames: pivot_inputs + pivot_predictions are 2 x 12 x 4 x 16 x 3 x 60 x 104 x 4 bytes.
    assert report["tensor_bytes_worst_pivot"] >= 2 * 12 * 4 * 16 * 3 * 60 * 104 * 4
    # The default parts are 4 MiB - 64 bytes, which keeps Redis's allocator overhead near zero (exactly
    # 4 MiB would land in jemalloc's 5 MiB class: +25%).
    assert report["overhead_factor"] < 1.01
    assert report["overhead_factor_with_better_max_value_bytes"] < 1.01
