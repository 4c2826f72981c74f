"""Shared by every role (actors/, learner/, rewards/, cluster/), and importing none of them:

config.py     the one pydantic config, with the reward-model specs; `python -m common.config`
model/        the generator and what builds it (transformer, sampler, noise, loading, adapters,
              policy, prompt embeddings)
dataflow/     what travels between roles (jobs, group records, the Redis replay buffer, weight
              packets)
toy/          the toy world (prompts, clips, text encoder)
durable.py    atomic, fsynced file and folder writes
seeds.py      the one seed derivation (blake2b of a text)
net.py        a free TCP port
video.py      uint8 frames and mp4 files
metrics.py    the Prometheus exporter
errors.py     RewardError
"""
