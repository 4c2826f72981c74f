"""The generator and what builds it: the causal Wan transformer (causal_wan), its few-step flow
scheduler and streaming sampler with its KV cache (scheduler, sampler), the seeded noise of a rollout
(noise), checkpoint, VAE and text-encoder loading (loading), the two LoRA adapters (adapters), the
prompt-embedding file (prompt_cache), and the policy every role holds, built from the config alone
(policy)."""
