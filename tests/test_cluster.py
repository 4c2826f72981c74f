"""End to end on a real local Ray with a real embedded redis-server: the toy job, weight versions,
staleness, worker-count invariance, the data-parallel learner, scaling while running."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cluster.local import ray_env_defaults
from common.config import load_config
from tests.helpers import SMALL_TOY_JOB

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.cluster  # local Ray and embedded redis-servers

TOY = "configs/toy.yaml"
# Small but real: every phase runs, on 2 cores. Each run gets its own namespace so named actors of
# a finished run (killed asynchronously) never clash with the next one's.
SMALL = [
    *SMALL_TOY_JOB,
    "run.checkpoint_every=2",
    "run.iterations=3",
    "run.semi_iterations=2",
    "replay.num_reference_groups=3",
]


@pytest.fixture(scope="module")
def local_ray():
    ray_env_defaults()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        configure_logging=False,
        log_to_driver=False,
    )
    yield
    ray.shutdown()


def toy_config(tmp_path: Path, *overrides: str):
    name = f"t{uuid.uuid4().hex[:8]}"
    return load_config(
        TOY, [*SMALL, f"run.name={name}", f"run.output_dir={tmp_path}", f"cluster.namespace={name}", *overrides]
    )


def toy_job(tmp_path: Path, *overrides: str):
    from cluster.train import RunFolder, run

    cfg = toy_config(tmp_path, *overrides)
    folder = RunFolder(tmp_path / cfg.run.name)
    return run(cfg, folder), folder.root


def metrics(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]


def adapter(root: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(root / "adapters" / name / "pytorch_lora_weights.safetensors")


def test_toy_job_runs_every_phase_and_writes_the_run_folder(local_ray, tmp_path):
    summary, root = toy_job(tmp_path)
    for key in ("reward_initial", "reward_final", "ood_initial", "ood_final", "iterations", "groups", "wall_seconds"):
        assert key in summary
    assert summary["iterations"] == 3
    assert summary["groups"] == 3 + 3 * 2  # reference groups + on-policy groups
    # semi: 2 updates, on-policy: 3 updates; every worker ends on the last version.
    assert summary["weight_version"] == 5
    assert summary["worker_weight_versions"] == [5]
    assert summary["reward_failures"] == 0 and summary["dropped_stale"] == 0
    for rel in (
        "config.yaml",
        "reward_curve.png",
        "summary.json",
        "samples/start_0.mp4",
        "samples/end_0.mp4",
        "adapters/on_policy/pytorch_lora_weights.safetensors",
        "adapters/semi/pytorch_lora_weights.safetensors",
        "report.html",
        "merge_sweep.png",
        "export/pytorch_lora_weights.safetensors",
        "export/model_card.md",
    ):
        assert (root / rel).is_file(), rel
    # reference done, semi 2/2, semi done, on-policy 2/3, on-policy done: each complete, none half-written.
    checkpoints = sorted((root / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == [f"ckpt-{i:06d}" for i in range(1, 6)]
    for ckpt in checkpoints:
        assert {p.name for p in ckpt.iterdir()} == {"learner.pt", "adapters", "driver.json", "COMPLETE"}
    assert json.loads((checkpoints[-1] / "driver.json").read_text())["completed"] == ["reference", "semi", "on_policy"]
    assert (root / "reward_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = metrics(root)
    assert [r["iteration"] for r in rows if r["phase"] == "on_policy"] == [0, 1, 2]
    assert [r["version"] for r in rows if r["phase"] == "semi"] == [1, 2]
    # Both adapters really trained (LoRA B starts at zero).
    for name in ("on_policy", "semi"):
        assert any(v.abs().sum() > 0 for k, v in adapter(root, name).items() if "lora_B" in k), name
    assert set(summary["sweep"]) == {"0.0", "1.0"}
    # The merge scale is the dual-improvement rule's choice over the reported sweep, else the
    # configured run.merge_scale (0.8), and the final scores are that merged policy's.
    from learner.merge import Scores, pick_merge_scale

    sweep = {float(s): Scores(v["in_domain"][0], v["out_of_domain"][0]) for s, v in summary["sweep"].items()}
    chosen = pick_merge_scale(Scores(summary["reward_initial"], summary["ood_initial"]), sweep)
    assert summary["dual_improvement_passed"] == (chosen is not None)
    assert summary["final_policy"] == "merged" and summary["merge_scale"] == (chosen if chosen is not None else 0.8)
    if chosen is not None:  # the final evaluation repeats the sweep's, on the same set and noise
        assert summary["reward_final"] == pytest.approx(sweep[chosen].in_domain.mean, abs=1e-6)
        assert summary["ood_final"] == pytest.approx(sweep[chosen].out_of_domain.mean, abs=1e-6)
    # The on-policy adapter alone is evaluated too (the sweep's s = 1 point also carries dW_semi).
    alone = summary["on_policy_alone"]
    assert set(alone) == {"in_domain", "out_of_domain"} and all(0 < alone[k][0] < 4 for k in alone)
    # Scores come with their standard errors over the 2 + 2 evaluation videos, and the table has them.
    assert summary["eval_videos"] == {"in_domain": 2, "out_of_domain": 2}
    assert summary["reward_initial_stderr"] > 0 and summary["ood_initial_stderr"] > 0
    assert [r["policy"] for r in summary["scores"]][0] == "reference (base)"

    # One evaluator: the job's first evaluation (rollout worker + reward server) is the in-process
    # one's (cluster/inprocess.py, the toy bench's) on the same config, video for video.
    from cluster.inprocess import InProcessRun
    from common.model import adapters

    run = InProcessRun(toy_config(tmp_path))
    with adapters.reference_policy(run.model):
        base = run.evaluate()
    assert base.in_domain.mean == pytest.approx(summary["reward_initial"], abs=1e-5)
    assert base.out_of_domain.mean == pytest.approx(summary["ood_initial"], abs=1e-5)

    # The exported policy, streamed by cluster.generate, makes the job's own end sample: same prompt,
    # same noise seed, same frames (both are H.264 of uint8 frames: compared decoded, as test_generate does).
    from cluster.generate import generate
    from common.video import read_mp4

    prompts = (root / "samples" / "prompts.txt").read_text().splitlines()
    made = generate(toy_config(tmp_path), root / "export", prompts, tmp_path / "generated", fps=8.0, log=lambda _: None)
    mine, _ = read_mp4(made["videos"][0])
    job, _ = read_mp4(root / "samples" / "end_0.mp4")
    assert mine.shape == job.shape
    assert ((mine.int() - job.int()).abs() > 2).float().mean() < 0.01

    # The job stopped its embedded Redis; started again on the same data directory (AOF), the
    # reference buffer and its counters are all there.
    from common.dataflow.redis_server import EmbeddedRedis
    from common.dataflow.replay import ReplayBuffer

    with EmbeddedRedis(root / "redis") as server:
        buffer = ReplayBuffer(server.url, root.name)
        stats = buffer.stats()
        assert buffer.size() == 3 and stats["inserts"] == 3
        assert stats["samples"] == 2 * 2  # two semi updates of two groups each
        buffer.close()


def test_one_and_two_rollout_workers_make_the_same_run(local_ray, tmp_path):
    phases = "run.phases=[on_policy]"
    one, root1 = toy_job(tmp_path, phases, "rollout.num_workers=1")
    r1 = [r["reward_mean"] for r in metrics(root1) if r["phase"] == "on_policy"]
    a1 = adapter(root1, "on_policy")
    # Two workers over the collective transport (the scaling test covers two over the object store).
    for transport in ("collective",):
        two, root2 = toy_job(tmp_path, phases, "rollout.num_workers=2", f"cluster.weight_transport={transport}")
        assert two["worker_weight_versions"] == [3, 3], transport
        assert two["weight_sync_bytes"] > 0
        assert [r["reward_mean"] for r in metrics(root2) if r["phase"] == "on_policy"] == r1, transport
        a2 = adapter(root2, "on_policy")
        assert a1.keys() == a2.keys()
        for k in a1:
            torch.testing.assert_close(a1[k], a2[k], rtol=0, atol=1e-6)


def test_staleness_is_enforced(local_ray, tmp_path):
    # Jobs one iteration ahead of the learner make groups one version old: dropped at max_staleness 0 ...
    strict, _ = toy_job(tmp_path, "run.phases=[on_policy]", "learner.max_staleness=0", "rollout.prefetch_iterations=1")
    assert strict["dropped_stale"] > 0
    assert strict["max_staleness_trained"] == 0
    # ... and trained at max_staleness 1, never older.
    loose, root = toy_job(
        tmp_path,
        "run.phases=[on_policy]",
        "learner.max_staleness=1",
        "rollout.prefetch_iterations=1",
        "run.tensorboard=true",
    )
    assert loose["dropped_stale"] == 0
    assert loose["max_staleness_trained"] == 1
    assert all(r.get("staleness_max", 0) <= 1 for r in metrics(root))
    # run.tensorboard: the job's own records as scalars, its samples as GIFs, read back from the events.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    logged = [(e.step, e.value) for e in events.Scalars("on_policy/reward_mean")]
    expected = [(r["iteration"], r["reward_mean"]) for r in metrics(root) if r["phase"] == "on_policy"]
    assert [s for s, _ in logged] == [s for s, _ in expected] == [0, 1, 2]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert {"samples/start/0", "samples/end/0"} <= set(events.Tags()["images"])


def test_scaling_rollout_workers_mid_run_loses_nothing(local_ray, tmp_path):
    from cluster.scale import set_rollout_workers

    name_box = {}

    def operator():
        # Grow to 2 once the first on-policy iteration is logged, shrink back to 1 after the next.
        while "root" not in name_box:
            time.sleep(0.05)
        root, ns = name_box["root"], name_box["ns"]

        def on_policy_rows():
            path = root / "metrics.jsonl"
            return [r for r in metrics(root) if r["phase"] == "on_policy"] if path.exists() else []

        deadline = time.time() + 300
        while len(on_policy_rows()) < 1 and time.time() < deadline:
            time.sleep(0.05)
        set_rollout_workers(2, namespace=ns)
        while len(on_policy_rows()) < 3 and time.time() < deadline:
            time.sleep(0.05)
        set_rollout_workers(1, namespace=ns)

    from cluster.train import RunFolder, run

    name = f"t{uuid.uuid4().hex[:8]}"
    overrides = [
        *SMALL,
        f"run.name={name}",
        f"run.output_dir={tmp_path}",
        f"cluster.namespace={name}",
        "run.phases=[on_policy]",
        "run.iterations=6",
    ]
    cfg = load_config(TOY, overrides)
    root = tmp_path / name
    name_box.update(root=root, ns=name)
    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    summary = run(cfg, RunFolder(root))
    thread.join(timeout=5)
    assert "+rollout-1" in summary["scaling_events"]
    assert any(e.startswith("-rollout-") for e in summary["scaling_events"])
    assert summary["groups"] == 6 * 2 and summary["worker_failures"] == 0
    assert [r["groups"] for r in metrics(root) if r["phase"] == "on_policy"] == [2] * 6
    # Same seeds, same weights: the scaled run made exactly the unscaled run's groups.
    baseline, base_root = toy_job(tmp_path, "run.phases=[on_policy]", "run.iterations=6")
    assert [r["reward_mean"] for r in metrics(root) if r["phase"] == "on_policy"] == [
        r["reward_mean"] for r in metrics(base_root) if r["phase"] == "on_policy"
    ]


def _train_with(learners, iteration: int, refs: list) -> list[dict]:
    k = len(learners)
    return ray.get(
        [
            learner.train_groups.remote(
                iteration,
                "on_policy",
                list(range(r, len(refs), k)),
                len(refs),
                *[refs[i] for i in range(r, len(refs), k)],
            )
            for r, learner in enumerate(learners)
        ]
    )


def test_prompts_are_encoded_once_in_a_task_on_the_rollout_resources(local_ray, tmp_path, umt5_dirs, monkeypatch):
    from cluster.placement import encode_prompts
    from common.model import loading
    from common.model.prompt_cache import CachedTextEncoder, PromptCacheError, with_cache_path
    from tests.conftest import make_umt5_dirs, tiny_config

    built: list = []
    monkeypatch.setattr(loading.TextEncoder, "__init__", lambda *a, **k: built.append(1))  # never in the driver

    def config(umt5):
        return with_cache_path(
            tiny_config(
                f"model.text_encoder={umt5 / 'text_encoder'}",
                f"model.tokenizer={umt5 / 'tokenizer'}",
                "rollout.num_cpus_per_worker=0.5",
            ),
            tmp_path,
        )

    cfg, prompts = config(umt5_dirs), ["a red circle", "a blue square moving left"]
    assert encode_prompts(cfg, prompts)["encoded"] == 2
    assert encode_prompts(cfg, [*prompts, "a green circle"]) == {
        "path": str(cfg.model.prompt_cache),
        "prompts": 3,
        "encoded": 1,
        "seconds": pytest.approx(0, abs=60),
    }
    assert CachedTextEncoder(cfg, encoder_on_miss=False).encode(prompts).shape == (2, 8, 16)
    # Another encoder's embeddings are refused with the file's own message, not a remote traceback.
    with pytest.raises(PromptCacheError, match=f"^{cfg.model.prompt_cache}: prompt embeddings of another text encoder"):
        encode_prompts(config(make_umt5_dirs(tmp_path / "other", seed=1)), prompts)
    assert not built


def test_two_learners_make_the_same_update_as_one(local_ray, tmp_path):
    from actors.rollout import collect_group
    from common.model.policy import Policy
    from common.model.prompt_cache import build, with_cache_path
    from common.video import from_uint8
    from learner.worker import Learner
    from rewards.toy import score

    # Random base weights (seeded), so the test does not depend on the committed toy generator.
    cfg = load_config(TOY, [*SMALL, "model.diffusers_transformer=null"])
    policy = Policy.from_config(cfg)
    policy.set_mode("on_policy")
    weights = {"vq": 1.0, "mq": 1.0, "ta": 1.0}
    prompts = [
        "a red circle moving left on a black background",
        "a green square moving up on a gray background",
        "a blue cross moving down on a brown background",
    ]
    key = b"k" * 32
    refs = []
    for i, prompt in enumerate(prompts):  # three groups: the two ranks get uneven shards (2 and 1)
        group = collect_group(
            policy.sampler,
            policy.text([prompt]),
            prompt,
            pivot=i % 4,
            group_size=4,
            sigma=0.5,
            plan_seed=i,
            fork_seed=100 + i,
            decode=policy.decode,
            reward_fn=lambda v, ps: score(from_uint8(v), ps, list(weights)),
            weights=weights,
            policy_version=0,
            adapter="on_policy",
        )
        assert group.rewards.std() > 0
        refs.append(ray.put(group.to_bytes(key=key)))

    # Learners read prompt embeddings only from the job's file (they never build a text encoder).
    cfg = with_cache_path(cfg, tmp_path)
    build(cfg, prompts, cfg.model.prompt_cache)
    config = cfg.model_dump(mode="json")
    actor = ray.remote(Learner).options(num_cpus=0.5)
    single = [actor.remote(config, 0, 1, None, key)]
    pair = [actor.remote(config, r, 2, None, key) for r in range(2)]
    host, port = ray.get(pair[0].address.remote())
    ray.get([x.join.remote(host, port) for x in pair] + [single[0].join.remote("127.0.0.1", 0)])
    for it in range(2):  # two updates, so the optimiser state must agree too
        one, two = _train_with(single, it, refs), _train_with(pair, it, refs)
        assert [s["groups"] for s in two] == [2, 1]
        assert abs(one[0]["grad_norm"] - two[0]["grad_norm"]) < 1e-6 * max(1.0, one[0]["grad_norm"])
    a = ray.get(single[0].adapter_tensors.remote("on_policy"))
    b0, b1 = ray.get([x.adapter_tensors.remote("on_policy") for x in pair])
    moved = sum((v - torch.zeros_like(v)).abs().sum().item() for k, v in a.items() if "lora_B" in k)
    assert moved > 0
    for k in a:
        torch.testing.assert_close(b0[k], a[k], rtol=0, atol=1e-6)
        assert torch.equal(b0[k], b1[k])  # the ranks stay identical
    for x in single + pair:
        ray.kill(x)


def test_a_run_whose_learner_dies_resumes_to_the_uninterrupted_result(local_ray, tmp_path):
    from cluster.train import RunFolder, run

    common = ["run.phases=[reference,semi,on_policy]", "run.iterations=4", "run.checkpoint_every=1"]
    reference, ref_root = toy_job(tmp_path, *common)

    name = f"t{uuid.uuid4().hex[:8]}"
    # run.max_learner_restarts=0: the job ends on the learner's death, as it did before in-job restores.
    cfg = load_config(
        TOY,
        [
            *SMALL,
            *common,
            "run.max_learner_restarts=0",
            f"run.name={name}",
            f"run.output_dir={tmp_path}",
            f"cluster.namespace={name}",
        ],
    )
    root = tmp_path / name

    def kill_learner_mid_run():
        deadline = time.time() + 300
        while time.time() < deadline:
            path = root / "metrics.jsonl"
            if path.exists() and sum(r["phase"] == "on_policy" for r in metrics(root)) >= 2:
                ray.kill(ray.get_actor("learner-0", namespace=name))
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_learner_mid_run, daemon=True)
    killer.start()
    # Whatever the learner's death surfaces as through the driver (a Ray actor error); what is
    # tested is the resume below.
    with pytest.raises(Exception):  # noqa: B017
        run(cfg, RunFolder(root))
    killer.join(timeout=5)
    resumed = run(cfg, RunFolder(root), resume=True)

    assert resumed["iterations"] == reference["iterations"] == 4
    assert resumed["weight_version"] == reference["weight_version"]
    rows = metrics(root)
    assert any(r["phase"] == "resume" for r in rows)
    a, b = adapter(ref_root, "on_policy"), adapter(root, "on_policy")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    a, b = adapter(ref_root, "semi"), adapter(root, "semi")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


def test_a_learner_that_dies_is_replaced_and_restored_and_the_run_goes_on(local_ray, tmp_path):
    from cluster.driver import surviving_rows
    from cluster.train import RunFolder, run

    # Two data-parallel ranks: killing one breaks their process group, so both are restarted.
    common = ["run.phases=[on_policy]", "run.iterations=5", "run.checkpoint_every=2", "learner.num_workers=2"]
    reference, ref_root = toy_job(tmp_path, *common)

    name = f"t{uuid.uuid4().hex[:8]}"
    cfg = load_config(
        TOY, [*SMALL, *common, f"run.name={name}", f"run.output_dir={tmp_path}", f"cluster.namespace={name}"]
    )
    root = tmp_path / name
    killed = {}

    def kill_a_learner_mid_run():
        # Once iteration 2 is logged: the newest checkpoint is the one after iteration 1, so the
        # restore rolls iteration 2 back (it was trained by the group that dies) and redoes it.
        deadline = time.time() + 300
        while time.time() < deadline:
            path = root / "metrics.jsonl"
            if path.exists() and sum(r["phase"] == "on_policy" for r in metrics(root)) >= 3:
                actor = ray.get_actor("learner-1", namespace=name)
                killed["pid"] = ray.get(actor.stats.remote())["pid"]
                ray.kill(actor)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_learner_mid_run, daemon=True)
    killer.start()
    summary = run(cfg, RunFolder(root))  # no exception, no --resume: the job recovers by itself
    killer.join(timeout=5)
    assert killed, "the learner was never killed"
    assert summary["learner_restarts"] == 1
    assert summary["iterations"] == 5 and summary["weight_version"] == reference["weight_version"] == 5
    assert summary["worker_weight_versions"] == [5]
    assert summary["groups"] == reference["groups"] == 5 * 2  # the counters went back with the restore

    rows = metrics(root)
    [restore] = [r for r in rows if r["phase"] == "restore"]
    assert restore["checkpoint"] == "ckpt-000001" and restore["at"] == {"phase": "on_policy", "iteration": 2}
    assert restore["version"] == 2 and restore["learner_restarts"] == 1
    tried = [r["iteration"] for r in rows if r["phase"] == "on_policy"]
    assert tried.count(2) == 2, tried  # iteration 2 was trained by the dead group, then again
    # In the weights that survive, each on-policy iteration's groups were trained exactly once: the
    # jobs the schedule fixed (ids after the 3 reference ids), none twice, none missing.
    trained = [r for r in surviving_rows(rows) if r["phase"] == "on_policy"]
    assert [r["iteration"] for r in trained] == [0, 1, 2, 3, 4]
    ids = [j for r in trained for j in r["job_ids"]]
    assert sorted(ids) == list(range(3, 3 + 5 * 2)) and len(set(ids)) == len(ids)
    assert [r["job_ids"] for r in trained] == [r["job_ids"] for r in metrics(ref_root) if r["phase"] == "on_policy"]
    # Same groups, same updates: the uninterrupted run's adapters (the redone iterations were made
    # with the restored weights, broadcast before their jobs).
    a, b = adapter(ref_root, "on_policy"), adapter(root, "on_policy")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    assert [r["reward_mean"] for r in trained] == pytest.approx(
        [r["reward_mean"] for r in metrics(ref_root) if r["phase"] == "on_policy"], abs=1e-6
    )


def test_resume_arguments():
    import argparse

    from cluster.train import parse_args

    parser = argparse.ArgumentParser()
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("overrides", nargs="*")
    assert parse_args(parser, ["--resume", "auto", "run.name=a"]).resume == "auto"
    assert parse_args(parser, ["run.name=a", "--resume=auto"]).resume == "auto"
    bare = parse_args(parser, ["--resume", "run.name=a"])  # a bare --resume keeps its meaning
    assert bare.resume is True and bare.overrides == ["run.name=a"]
    assert parse_args(parser, ["run.name=a"]).resume is False


def test_resume_auto_starts_afresh_over_a_first_attempt_and_resumes_from_a_checkpoint(local_ray, tmp_path):
    from cluster.train import main
    from common.dataflow.redis_server import EmbeddedRedis
    from common.dataflow.replay import ReplayBuffer
    from tests.helpers import group

    name = f"t{uuid.uuid4().hex[:8]}"
    root = tmp_path / name
    with EmbeddedRedis(tmp_path / "redis") as server:
        argv = [
            "--config",
            TOY,
            *SMALL,
            "run.phases=[reference,on_policy]",
            "run.iterations=2",
            f"run.name={name}",
            f"run.output_dir={tmp_path}",
            f"cluster.namespace={name}",
            f"replay.redis_url={server.url}",
            "--resume",
            "auto",
        ]
        # What a first attempt that died before its first checkpoint leaves: the run folder with its
        # first records, a checkpoint being written, and part of the reference buffer in Redis.
        (root / "checkpoints" / ".tmp-0123").mkdir(parents=True)
        (root / "checkpoints" / "ckpt-000001").mkdir()  # no COMPLETE
        (root / "metrics.jsonl").write_text(json.dumps({"phase": "reference", "groups": 1, "job_ids": [0]}) + "\n")
        buffer = ReplayBuffer(server.url, name)
        buffer.insert(group(0))

        assert main(argv) == 0  # a fresh start: neither the folder nor the buffer is refused
        first = metrics(root)
        assert not any(r["phase"] == "resume" for r in first)
        assert [r["job_ids"] for r in first if r["phase"] == "reference"] == [[0, 1, 2]]
        assert [r["iteration"] for r in first if r["phase"] == "on_policy"] == [0, 1]
        assert buffer.size() == 3  # the partial buffer was cleared before the reference phase
        assert json.loads((root / "summary.json").read_text())["groups"] == 3 + 2 * 2
        checkpoints = sorted(p.name for p in (root / "checkpoints").iterdir())
        # The reference phase's end, on-policy iteration 1 (run.checkpoint_every=2) and the on-policy end.
        assert checkpoints == ["ckpt-000001", "ckpt-000002", "ckpt-000003"]
        assert all((root / "checkpoints" / c / "COMPLETE").is_file() for c in checkpoints)

        # The same entrypoint again (a retried RayJob): there is a complete checkpoint now, so it resumes.
        assert main(argv) == 0
        again = metrics(root)
        assert again[: len(first)] == first
        resumed = again[len(first) :]
        assert resumed[0]["phase"] == "resume" and resumed[0]["checkpoint"] == "ckpt-000003"
        assert not any(r["phase"] in ("reference", "on_policy") for r in resumed)  # nothing trained again
        assert buffer.size() == 3
        assert json.loads((root / "summary.json").read_text())["groups"] == 3 + 2 * 2
        buffer.close()


def test_killed_workers_reward_servers_and_a_redis_restart_lose_no_group(local_ray, tmp_path):
    from bench.faults import run_with_faults

    overrides = [
        *SMALL,
        "run.phases=[reference,on_policy]",
        "run.iterations=5",
        "replay.num_reference_groups=3",
        "rollout.num_workers=2",
        "run.checkpoint_every=1000",
    ]
    result = run_with_faults(overrides, seed=1, kills=3, root=tmp_path, config_path=TOY)
    assert result["finished"], result["error"]
    assert result["faults_injected"] >= 3 and "restart redis" in result["events"]
    assert any(e.startswith("kill rollout") for e in result["events"])
    assert any(e.startswith("kill reward") for e in result["events"])
    assert result["groups_lost"] == 0 and result["groups_duplicated"] == 0
    assert result["groups_produced"] == result["groups_expected"] == 3 + 5 * 2
    assert result["buffer_items_before_restart"] == result["buffer_items_after_restart"] == 3
    assert result["weight_version"] == 5


def test_a_hung_rollout_worker_is_replaced(local_ray, tmp_path):
    import os
    import signal

    from cluster.train import RunFolder, run

    name = f"t{uuid.uuid4().hex[:8]}"
    cfg = load_config(
        TOY,
        [
            *SMALL,
            "run.phases=[on_policy]",
            "run.iterations=4",
            f"run.name={name}",
            f"run.output_dir={tmp_path}",
            f"cluster.namespace={name}",
            "cluster.heartbeat_s=0.5",
            "cluster.heartbeat_timeout_s=2",
            "cluster.call_timeout_s=15",
        ],
    )
    root = tmp_path / name
    stopped = {}

    def freeze_worker():  # SIGSTOP: alive to the OS, silent to Ray, like a hang in a CUDA kernel
        deadline = time.time() + 300
        while time.time() < deadline:
            if (root / "metrics.jsonl").exists() and any(r["phase"] == "on_policy" for r in metrics(root)):
                pid = ray.get(ray.get_actor("rollout-0", namespace=name).ping.remote())["pid"]
                os.kill(pid, signal.SIGSTOP)
                stopped["pid"] = pid
                return
            time.sleep(0.05)

    thread = threading.Thread(target=freeze_worker, daemon=True)
    thread.start()
    summary = run(cfg, RunFolder(root))
    thread.join(timeout=5)
    assert stopped, "the worker was never frozen"
    assert summary["groups"] == 4 * 2 and summary["worker_failures"] >= 1
    assert summary["heartbeats_missed"] + summary["jobs_redone"] >= 1
    assert [r["groups"] for r in metrics(root) if r["phase"] == "on_policy"] == [2] * 4
    assert "lost rollout-0" in summary["scaling_events"] or summary["jobs_redone"] >= 1


def test_a_fresh_run_refuses_a_buffer_left_by_an_earlier_run(tmp_path):
    from cluster.train import RunFolder, run
    from common.dataflow.redis_server import EmbeddedRedis
    from common.dataflow.replay import ReplayBuffer, ReplayError
    from tests.helpers import group

    with EmbeddedRedis(tmp_path / "redis") as server:
        ReplayBuffer(server.url, "old").insert(group(0))
        cfg = load_config(TOY, [*SMALL, "run.name=old", f"run.output_dir={tmp_path}", f"replay.redis_url={server.url}"])
        with pytest.raises(ReplayError, match="already holds 1 items.*--resume"):
            run(cfg, RunFolder(tmp_path / "old"))
        assert ReplayBuffer(server.url, "old").size() == 1  # nothing was cleared


@pytest.mark.parametrize("during", ["broadcast", "rendezvous"])
def test_a_rollout_worker_killed_in_a_weight_sync_is_dropped(local_ray, tmp_path, monkeypatch, during):
    """cluster.weight_transport=collective with 2 rollout workers. Right before the broadcast of
    version 2 goes out (or the job's first group forms), rollout-1 is stopped (SIGSTOP: it cannot
    take its part, so that broadcast or rendezvous cannot complete for it), and one second into it,
    killed. The driver drops it, aborts the group's generation (no member waits for gloo's timeout),
    finishes the sync for the survivor (over a new group when it did not have the packet yet), and
    the run goes on: every iteration's groups, a replacement worker synced, every worker at the final
    version, no learner restart."""
    import os
    import signal

    from cluster.placement import RunRoles

    method = "_send" if during == "broadcast" else "_form_group"
    original, armed, killed = getattr(RunRoles, method), {}, {}

    def stop_then_kill_rollout_1(self, *args):
        members = args[1] if during == "broadcast" else args[0]
        due = args[0].version == 2 if during == "broadcast" else self._generation == -1
        if due and not armed and "rollout-1" in members:
            armed["yes"] = True
            pid = ray.get(self.pool.workers["rollout-1"].ping.remote())["pid"]
            os.kill(pid, signal.SIGSTOP)

            def kill():
                time.sleep(1.0)  # the call below is out by now, and cannot finish for rollout-1
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid

            threading.Thread(target=kill, daemon=True).start()
        return original(self, *args)

    monkeypatch.setattr(RunRoles, method, stop_then_kill_rollout_1)
    summary, root = toy_job(
        tmp_path,
        "run.phases=[on_policy]",
        "run.iterations=4",
        "rollout.num_workers=2",
        "cluster.weight_transport=collective",
        "cluster.call_timeout_s=120",  # also gloo's timeout: a member left waiting would show
    )
    assert killed, "rollout-1 was never killed"
    assert summary["learner_restarts"] == 0
    assert summary["iterations"] == 4 and summary["weight_version"] == 4
    # Every iteration's groups: the jobs the schedule fixed (ids after the 3 reference ids), once each.
    rows = [r for r in metrics(root) if r["phase"] == "on_policy"]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert [r["job_ids"] for r in rows] == [[3 + 2 * i, 4 + 2 * i] for i in range(4)]
    assert summary["groups"] == 4 * 2
    # The dead worker was dropped in that very sync and a replacement started, without holding up the
    # run: every worker that is up is at v4 (the replacement too, unless it was still starting at the end).
    assert "lost rollout-1" in summary["scaling_events"] and "+rollout-2" in summary["scaling_events"]
    assert set(summary["rollout_workers_starting"]) <= {"rollout-2"}
    assert summary["worker_weight_versions"] == [4] * (2 - len(summary["rollout_workers_starting"]))
    assert summary["worker_failures"] >= 1
    counters = json.loads((sorted((root / "checkpoints").iterdir())[-1] / "driver.json").read_text())["counters"]
    assert counters["weight_sync_workers_lost"] == 1
    log = summary["weight_sync_log"]  # the syncs after updates (the job's first sync is not one)
    if during == "broadcast":
        [sync] = [s for s in log if s["version"] == 2]
        assert sync["lost"] == ["rollout-1"] and sync["attempts"] >= 1, sync
        # That sync took well under gloo's timeout (120 s): nobody was left waiting on the dead member.
        assert sync["seconds"] < 60, sync
    else:
        assert counters["weight_sync_retries"] >= 1  # the group never formed: formed again without it
    assert [s["version"] for s in log] == [1, 2, 3, 4]
    assert all(s["lost"] == [] for s in log if during == "rendezvous" or s["version"] != 2)
