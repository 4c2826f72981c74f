"""What travels between the roles: the driver's jobs and the summaries it gets back (jobs), the
rollout-group records that go rollout worker -> learner or -> Redis -> learner (records), the Redis
replay buffer that holds them and the embedded redis-server it can run on (replay, redis_server),
and the weight packets that go learner -> rollout workers (weights). Each side of a transfer
imports the format from here, so no role reaches into another."""
