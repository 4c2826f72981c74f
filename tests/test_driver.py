"""Driver.fit, the schedule, against stand-in roles: no Ray, no model, milliseconds.

The cluster tests (tests/test_cluster.py) run the same schedule on real actors; these check its
order and its resume points on their own.
"""

from __future__ import annotations

import pytest

from cluster.controller import Counters
from cluster.driver import Driver
from common.config import load_config
from common.dataflow.jobs import GroupSummary

TOY = "configs/toy.yaml"
SMALL = [
    "run.iterations=3",
    "run.semi_iterations=2",
    "replay.num_reference_groups=2",
    "rollout.prompts_per_iteration=2",
    "run.checkpoint_every=2",
    "run.eval_prompts=2",
    "run.eval_seeds=1",
    "run.sample_prompts=1",
    "run.merge_scales=[0.0,0.5]",
    "run.out_of_domain.num_prompts=1",
    "run.out_of_domain.seeds=1",
]
PROMPTS = ["a red ball", "a blue cube", "a green cone"]
HELDOUT = ["a yellow star"]


class FakeRoles:
    """RunRoles' methods, recording what the driver asked for."""

    def __init__(self, counters: Counters):
        self.counters, self.calls, self.version = counters, [], 0

    def collect(self, jobs, on_progress=None):
        self.calls.append(("collect", jobs[0].phase, [j.job_id for j in jobs]))
        self.counters.groups += len(jobs)
        if on_progress is not None:
            on_progress(len(jobs))
        return [
            (
                GroupSummary(j.job_id, j.phase, f"g{j.job_id}", self.version, "rollout-0", 1.0, 0.1, {"vq": 1.0}),
                f"ref{j.job_id}",
            )
            for j in jobs
        ]

    def prefetch(self, jobs):
        self.calls.append(("prefetch", [j.job_id for j in jobs]))

    def _update(self, it: int):
        self.version += 1
        return [
            {"version": self.version, "groups": 2, "loss": 0.5, "clip_fraction": 0.0, "grad_norm": 1.0, "seconds": 0.0}
        ]

    def train_from_replay(self, iteration, adapter, batch_size, seed):
        self.calls.append(("train_from_replay", adapter, iteration))
        return self._update(iteration)

    def train_groups(self, iteration, refs):
        self.calls.append(("train_groups", iteration, refs))
        return self._update(iteration)

    def publish_and_sync(self):
        self.calls.append(("publish_and_sync",))

    def rollout_workers(self):
        return ["rollout-0"]

    def live_rollout_workers(self):
        return ["rollout-0"]

    def evaluate(self, prompts, seeds, mode, merge_scale):
        self.calls.append(("evaluate", mode, merge_scale))
        gain = {"reference": 0.0, "semi": 0.05, "merged": 0.1 * merge_scale, "on_policy": 0.2}[mode]
        # The out-of-domain score rises a little with the merge (0.5 at the base: a tie would not pass).
        ood = 0.5 + (0.01 * merge_scale if mode == "merged" else 0.0)
        return [{"vq": 1.0 + gain, "mq": 1.0, "ta": 1.0, "ood": ood} for _ in prompts]

    def sample_videos(self, prompts, seeds, mode, scale, fps):
        self.calls.append(("sample_videos", mode, scale))
        return [b"mp4"] * len(prompts)

    def save_checkpoint(self, root, state):
        self.calls.append(("save_checkpoint", state.get("phase"), state.get("iteration"), list(state["completed"])))

    def load_checkpoint(self, checkpoint):
        self.calls.append(("load_checkpoint", checkpoint.name))


def make_driver(tmp_path, *overrides):
    config = load_config(TOY, [*SMALL, *overrides])
    counters = Counters()
    roles = FakeRoles(counters)
    records = []
    saved = lambda tag, prompts, videos: [f"samples/{tag}_{i}.mp4" for i in range(len(videos))]  # noqa: E731
    driver = Driver(
        config,
        roles,
        counters,
        PROMPTS,
        log_metrics=records.append,
        save_samples=saved,
        checkpoint_dir=tmp_path / "checkpoints",
        heldout=HELDOUT,
    )
    return driver, roles, records


def test_fit_runs_the_schedule_in_order(tmp_path):
    driver, roles, records = make_driver(tmp_path)
    result = driver.fit()
    steps = [c for c in roles.calls if c[0] != "prefetch"]
    assert steps == [
        ("evaluate", "reference", 1.0),
        ("sample_videos", "reference", 1.0),
        ("collect", "reference", [0, 1]),
        ("save_checkpoint", None, None, ["reference"]),
        ("train_from_replay", "semi", 0),
        ("train_from_replay", "semi", 1),
        ("save_checkpoint", "semi", 2, ["reference"]),
        ("publish_and_sync",),
        ("save_checkpoint", None, None, ["reference", "semi"]),
        ("collect", "on_policy", [2, 3]),
        ("train_groups", 0, ["ref2", "ref3"]),
        ("publish_and_sync",),
        ("collect", "on_policy", [4, 5]),
        ("train_groups", 1, ["ref4", "ref5"]),
        ("publish_and_sync",),
        ("save_checkpoint", "on_policy", 2, ["reference", "semi"]),
        ("collect", "on_policy", [6, 7]),
        ("train_groups", 2, ["ref6", "ref7"]),
        ("publish_and_sync",),
        ("save_checkpoint", None, None, ["reference", "semi", "on_policy"]),
        ("evaluate", "merged", 0.0),
        ("evaluate", "merged", 0.5),
        ("evaluate", "on_policy", 1.0),
        ("evaluate", "merged", 0.5),
        ("sample_videos", "merged", 0.5),
    ]
    assert (result.final_policy, result.merge_scale, result.merge["dual_improvement_passed"]) == ("merged", 0.5, True)
    assert result.samples == {"start": ["samples/start_0.mp4"], "end": ["samples/end_0.mp4"]}
    assert result.after.in_domain.mean > result.before.in_domain.mean
    # The evaluation set: 2 training prompts and 1 held-out prompt, 1 seed each; the in-domain score
    # is the training reward on the first, the out-of-domain one `ood` on the second.
    assert driver.eval_set.prompts == ["a red ball", "a blue cube", "a yellow star"]
    assert result.before.in_domain.values == (3.0, 3.0) and result.before.out_of_domain.values == (0.5,)
    assert result.merge["sweep"]["0.5"]["out_of_domain"][0] == pytest.approx(0.505)
    assert [r["phase"] for r in records] == [
        "eval",
        "reference",
        "semi",
        "semi",
        "on_policy",
        "on_policy",
        "on_policy",
        "eval",
    ]
    assert driver.version == 5 and driver.counters.weight_syncs == 4


def test_fit_without_merge_ends_on_the_last_adapter_trained(tmp_path):
    driver, roles, _ = make_driver(tmp_path, "run.phases=[reference,semi]")
    result = driver.fit()
    assert (result.final_policy, result.merge_scale, result.merge) == ("semi", 1.0, {})
    assert roles.calls[-2:] == [("evaluate", "semi", 1.0), ("sample_videos", "semi", 1.0)]


def test_fit_resumes_where_the_checkpoint_stood(tmp_path):
    import json

    ckpt = tmp_path / "checkpoints" / "ckpt-000004"
    ckpt.mkdir(parents=True)
    state = {
        "completed": ["reference", "semi"],
        "phase": "on_policy",
        "iteration": 2,
        "version": 4,
        "before": {"in_domain": [3.0, 3.0], "out_of_domain": [0.5], "parts": {"vq": 1.0, "mq": 1.0, "ta": 1.0}},
        "samples_start": ["s.mp4"],
        "counters": {
            "groups": 6,
            "groups_by_phase": {"reference": 2, "on_policy": 4},
            "dropped_stale": 0,
            "reward_failures": 0,
            "worker_failures": 0,
            "jobs_redone": 0,
            "weight_syncs": 3,
            "stale_trained_max": 0,
        },
    }
    (ckpt / "driver.json").write_text(json.dumps(state))
    driver, roles, records = make_driver(tmp_path)
    roles.version = 4
    result = driver.fit(resume_from=ckpt)
    steps = [c for c in roles.calls if c[0] not in ("prefetch", "evaluate")]
    # No initial evaluation or start samples, no reference or semi phase: on-policy from iteration 2.
    assert steps[:5] == [
        ("load_checkpoint", "ckpt-000004"),
        ("publish_and_sync",),
        ("collect", "on_policy", [6, 7]),
        ("train_groups", 2, ["ref6", "ref7"]),
        ("publish_and_sync",),
    ]
    assert records[0] == {"phase": "resume", "checkpoint": "ckpt-000004", "version": 4}
    assert result.samples["start"] == ["s.mp4"] and result.before.in_domain.mean == 3.0
    assert driver.counters.groups == 8 and driver.counters.weight_syncs == 5
