"""LoRA adapters: reference policy, separate training, merging, diffusers-compatible files."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from common.model import adapters
from common.model.causal_wan import CausalWanTransformer3DModel
from tests.conftest import BF16_ULP, DTYPES, cast_copy, tiny_config

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


def _model_with_adapters(seed=0, dtype=torch.float32):
    # As common/model/policy.py builds it: the base in `dtype` (load_policy casts), then the adapters.
    torch.manual_seed(seed)
    cfg = tiny_config()
    model = CausalWanTransformer3DModel(**cfg.model.transformer.kwargs()).eval().cast(dtype)
    adapters.add_adapters(model, rank=4, alpha=8, target_modules=TARGETS)
    # Fresh LoRA B is zero (identity); give both adapters real, different weights.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def _inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(5)
    x, text = torch.randn(1, 4, 2, 8, 8, generator=gen), torch.randn(1, 8, 16, generator=gen)
    return x.to(dtype), torch.tensor([700.0]), text.to(dtype)


@torch.no_grad()
def _out(model):
    return model(*_inputs(model.compute_dtype), return_dict=False)[0]


def _lora_dtypes(model) -> set[torch.dtype]:
    return {p.dtype for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("dtype", DTYPES)
def test_fresh_adapters_are_identity_and_disabled(dtype):
    torch.manual_seed(0)
    cfg = tiny_config()
    base = CausalWanTransformer3DModel(**cfg.model.transformer.kwargs()).eval().cast(dtype)
    expected = _out(base)
    adapters.add_adapters(base, rank=4, alpha=8, target_modules=TARGETS)
    # LoRA weights are float32 master weights on a base of any dtype; the base keeps its dtype.
    assert _lora_dtypes(base) == {torch.float32}
    assert base.blocks[0].attn1.to_q.base_layer.weight.dtype == dtype
    # Bit for bit in bf16 too: peft adds the adapter's exact zero in float32 and rounds back.
    assert torch.equal(_out(base), expected)
    adapters.use_adapter(base, adapters.ON_POLICY)
    assert torch.equal(_out(base), expected)  # B = 0
    assert _out(base).dtype == dtype


def test_targets_cover_attention_and_ffn_of_every_block():
    model = _model_with_adapters()
    names = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A.on_policy" in n}
    for b in range(2):
        for m in [
            "attn1.to_q",
            "attn1.to_k",
            "attn1.to_v",
            "attn1.to_out.0",
            "attn2.to_q",
            "attn2.to_k",
            "attn2.to_v",
            "attn2.to_out.0",
            "ffn.net.0.proj",
            "ffn.net.2",
        ]:
            assert f"blocks.{b}.{m}" in names


@pytest.mark.parametrize("dtype", DTYPES)
def test_disabling_restores_the_base_exactly(dtype):
    model = _model_with_adapters(dtype=dtype)
    with adapters.reference_policy(model):
        base = _out(model)
    adapters.use_adapter(model, adapters.ON_POLICY)
    on = _out(model)
    assert (on - base).abs().max() > 1e-3
    with adapters.reference_policy(model):
        assert torch.equal(_out(model), base)
    assert torch.equal(_out(model), on)  # state restored after the context

    plain = CausalWanTransformer3DModel(**tiny_config().model.transformer.kwargs()).eval().cast(dtype)
    base_weights = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    plain.load_state_dict(base_weights)
    assert torch.equal(_out(plain), base)


@pytest.mark.parametrize("dtype", DTYPES)
def test_training_one_adapter_leaves_the_other_alone(dtype):
    model = _model_with_adapters(dtype=dtype)
    semi_before = {k: v.clone() for k, v in adapters.adapter_state_dict(model, adapters.SEMI).items()}
    params = adapters.train_adapter(model, adapters.ON_POLICY)
    assert params and all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in model.parameters()) == len(params)
    opt = torch.optim.SGD(params, lr=0.1)
    x, t, text = _inputs(dtype)
    model(x, t, text, return_dict=False)[0].square().mean().backward()
    # A bf16 base backpropagates into float32 adapters: float32 gradients, float32 steps.
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in params)
    opt.step()
    for k, v in adapters.adapter_state_dict(model, adapters.SEMI).items():
        assert torch.equal(v, semi_before[k])
    # A snapshot taken before a step is not changed by the step (no aliasing of live parameters).
    snapshot = adapters.adapter_state_dict(model, adapters.ON_POLICY)
    opt.zero_grad()
    model(x, t, text, return_dict=False)[0].square().mean().backward()
    opt.step()
    live = adapters.adapter_state_dict(model, adapters.ON_POLICY)
    assert any(not torch.equal(snapshot[k], live[k]) for k in snapshot)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_is_base_plus_semi_plus_scaled_on_policy(dtype):
    model = _model_with_adapters(dtype=dtype)
    adapters.use_adapter(model, adapters.SEMI)
    semi_only = _out(model)
    adapters.merge_adapters(model, 0.0)
    assert torch.allclose(_out(model), semi_only, atol=1e-6)

    # One layer by hand: W = W_base + (alpha/r) (B_semi A_semi + s B_on A_on).
    s = 0.8
    adapters.merge_adapters(model, s)
    layer = model.blocks[0].attn1.to_q
    x = torch.randn(3, layer.in_features).to(dtype)
    scale = 8 / 4
    dW = lambda n: layer.lora_B[n].weight @ layer.lora_A[n].weight  # noqa: E731
    W = layer.base_layer.weight.float() + scale * (dW("semi") + s * dW("on_policy"))
    with torch.no_grad():
        expected = x.float() @ W.T + layer.base_layer.bias.float()
        got = layer(x)
    assert got.dtype == dtype
    if dtype == torch.float32:
        assert torch.allclose(got, expected, atol=1e-5)
    else:  # two bf16 roundings: the base layer's output, then the sum (measured 0.005 at |y| < 2.6)
        assert torch.allclose(got.float(), expected, rtol=2**-7, atol=BF16_ULP / 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_adapter_after_a_merge_runs_at_scale_one(dtype):
    # merge_adapters leaves on_policy at its merge scale in peft; "on-policy alone" taken after a
    # sweep that ends at 0.4 must still be the adapter at full strength, as in a fresh model.
    fresh = _model_with_adapters(dtype=dtype)
    adapters.use_adapter(fresh, adapters.ON_POLICY)
    alone = _out(fresh)
    model = _model_with_adapters(dtype=dtype)
    adapters.merge_adapters(model, 0.4)
    merged = _out(model)
    adapters.use_adapter(model, adapters.ON_POLICY)
    assert torch.equal(_out(model), alone)
    assert not torch.allclose(merged, alone)
    adapters.use_adapter(model, adapters.SEMI)
    adapters.merge_adapters(model, 0.4)
    assert torch.equal(_out(model), merged)


@pytest.mark.parametrize("dtype", DTYPES)
def test_saved_adapter_loads_into_diffusers_wan_with_same_outputs(tmp_path, dtype):
    model = _model_with_adapters(dtype=dtype)
    path = adapters.save_adapter(model, adapters.ON_POLICY, tmp_path / "on_policy")
    assert path.name == "pytorch_lora_weights.safetensors"
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        assert all(k.startswith("transformer.blocks.") for k in f.keys())
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # master weights, whatever the base

    reference = WanTransformer3DModel(**tiny_config().model.transformer.kwargs()).eval()
    reference = cast_copy(reference, dtype)
    base_weights = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    reference.load_state_dict(base_weights)
    reference.load_lora_adapter(
        str(tmp_path / "on_policy"), weight_name=path.name, prefix="transformer", adapter_name="aligned"
    )
    adapters.use_adapter(model, adapters.ON_POLICY)
    x, t, text = _inputs(dtype)
    with torch.no_grad():
        expected, got = reference(x, t, text, return_dict=False)[0], model(x, t, text, return_dict=False)[0]
    if dtype == torch.float32:
        assert torch.allclose(expected, got, atol=1e-6)
    else:  # diffusers' peft makes the LoRA layers bf16 like their base; ours stay float32
        assert (expected - got).abs().max() < 2 * BF16_ULP

    # And back into our model under another name: float32, whatever the base's dtype.
    other = _model_with_adapters(seed=3, dtype=dtype)
    adapters.load_adapter(other, tmp_path / "on_policy", adapters.ON_POLICY)
    assert _lora_dtypes(other) == {torch.float32}
    for k, v in adapters.adapter_state_dict(model, adapters.ON_POLICY).items():
        assert torch.equal(adapters.adapter_state_dict(other, adapters.ON_POLICY)[k], v)


def test_adapter_errors_name_the_adapter_and_file(tmp_path):
    model = _model_with_adapters()
    with pytest.raises(adapters.AdapterError, match="nope"):
        adapters.use_adapter(model, "nope")
    with pytest.raises(adapters.AdapterError, match="pytorch_lora_weights"):
        adapters.load_adapter(model, tmp_path / "missing", adapters.SEMI)
    state = adapters.adapter_state_dict(model, adapters.SEMI)
    key = next(iter(state))
    bad = dict(state)
    bad[key] = torch.zeros(1)
    with pytest.raises(adapters.AdapterError, match="shape"):
        adapters.load_adapter_state_dict(model, adapters.SEMI, bad)
    del bad[key]
    with pytest.raises(adapters.AdapterError, match="missing"):
        adapters.load_adapter_state_dict(model, adapters.SEMI, bad)
