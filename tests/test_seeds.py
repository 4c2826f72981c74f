"""The one seed derivation (common/seeds.py) gives exactly the numbers each caller drew before it
was shared: the values below were computed with the five hand-written blake2b derivations it
replaced (job_rng in common/dataflow/jobs.py, cluster/driver.phase_seed,
learner/worker.anchor_generator, the noise seeds of common/model/noise.py and the word vectors of
common/toy/world.py). A change here moves every job, noise tensor and toy embedding of every run."""

from __future__ import annotations

import hashlib

import pytest
import torch

from cluster.driver import phase_seed
from common.dataflow.jobs import job_rng, make_job
from common.model.noise import seeded_normal
from common.seeds import derive_seed
from common.toy.world import ToyTextEncoder
from learner.worker import anchor_generator


def test_derive_seed_is_blake2b_of_the_text_masked_to_bits():
    for text in ("0/reference/0", "(1, 'initial', 0, 0)", ""):
        full = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
        assert derive_seed(text, bits=64) == full
        assert derive_seed(text) == full & ((1 << 63) - 1)
        assert derive_seed(text, bits=62) == full & ((1 << 62) - 1)
    with pytest.raises(ValueError, match="bits"):
        derive_seed("x", bits=65)


def test_jobs_draw_the_pinned_values():
    got = [
        job_rng(s, p, j).getrandbits(64)
        for s, p, j in [(0, "reference", 0), (7, "on_policy", 12), (123456789, "semi", 3)]
    ]
    assert got == [17892343101274510268, 244663542293133765, 12666944881388767057]
    job = make_job(5, "reference", 3, ["a", "b", "c"], 4, "reference")
    assert (job.prompt, job.pivot, job.plan_seed, job.fork_seed) == ("b", 2, 1843216703, 1189700979)


def test_phase_seeds_and_anchor_generators_are_the_pinned_values():
    assert [phase_seed(s, p, i) for s, p, i in [(0, "semi", 0), (7, "on_policy", 5), (2**40, "merge", 1)]] == [
        3344658912615525089,
        2385871046584369764,
        3477003108044886424,
    ]
    assert [anchor_generator(s, i, k).initial_seed() for s, i, k in [(0, 0, 0), (3, 2, 1), (99, 17, 5)]] == [
        393751907897447445,
        600481789045963682,
        1467506109545592437,
    ]


def test_noise_seeds_are_the_pinned_values():
    assert [derive_seed(repr(p)) for p in [(0, "initial", 0, 0), (12345, "solver", 3, 2), (7, "fork", 1, 11)]] == [
        4076283938899374563,
        7784541829637435927,
        5706438047205447208,
    ]
    expected = torch.tensor([0.6712156534194946, -0.8415981531143188, 1.6543396711349487])
    assert torch.equal(seeded_normal((3,), 1, "initial", 0, 0), expected)


def test_toy_word_embeddings_are_the_pinned_values():
    expected = torch.tensor(
        [
            -0.20508767664432526,
            0.10501625388860703,
            -0.1440141797065735,
            -0.9598538875579834,
            2.200498580932617,
            1.0733184814453125,
            -0.5887414216995239,
            -0.25941458344459534,
            0.3618052303791046,
            -0.34493201971054077,
            -1.7072714567184448,
            0.29926803708076477,
        ]
    )
    got = ToyTextEncoder(dim=3).encode(["a red circle moving left on a black background"]).flatten()
    assert torch.equal(got, expected)
