"""The model zoo: each variant is built the way it claims, and every variant can learn."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tunestab import model as model_mod
from tunestab.config import VARIANTS, TrialConfig
from tunestab.model import (
    GPT,
    MLRAProjection,
    SigmaReparamLinear,
    attend,
    attention_logits,
    causal_block_mask,
    flex_capped_attention,
    linear_cross_entropy,
    padded_vocab,
    plain_attention,
)

TINY = dict(vocab_size=97, n_layer=2, n_head=4, d_model=64, seq_len=32)


def tiny(variant="baseline", **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(TrialConfig(variant=variant, **{**TINY, **kw}))


def batch(B=4, T=32, V=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g)


def test_baseline_is_gpt2_pre_ln():
    m = tiny()
    block = m.blocks[0]
    assert isinstance(block.ln_1, nn.LayerNorm) and isinstance(block.ln_2, nn.LayerNorm)
    assert isinstance(block.attn.q_norm, nn.Identity) and isinstance(block.attn.post_norm, nn.Identity)
    assert block.mlp.fc1.out_features == 4 * 64
    assert m.lm_head.weight is m.wte.weight  # tied by default
    assert tiny(tie_embeddings=False).lm_head.weight is not tiny(tie_embeddings=False).wte.weight
    # GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2L).
    big = GPT(TrialConfig(vocab_size=97, n_layer=4, d_model=256, n_head=4, seq_len=32))
    assert big.blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert big.blocks[0].mlp.fc2.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert big.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)


def test_qkv_norm_drops_pre_attention_norm_and_normalises_q_k_v():
    block = tiny("qkv_norm").blocks[0]
    assert isinstance(block.ln_1, nn.Identity)
    for ln in (block.attn.q_norm, block.attn.k_norm, block.attn.v_norm):
        assert isinstance(ln, nn.LayerNorm) and ln.normalized_shape == (16,)
    assert isinstance(block.ln_2, nn.LayerNorm)  # the MLP keeps its pre-norm


@pytest.mark.parametrize("variant", ["qk_norm", "qk_norm_cap", "qk_fc_norm", "qkv_norm"])
def test_q_and_k_are_normalised_per_head(variant):
    m = tiny(variant)
    seen = {}
    attn = m.blocks[1].attn
    attn.q_norm.register_forward_hook(lambda mod, i, o: seen.__setitem__("q", o))
    attn.k_norm.register_forward_hook(lambda mod, i, o: seen.__setitem__("k", o))
    with torch.no_grad():  # inputs well above LayerNorm's eps, also where there is no pre-norm
        m.wte.weight.mul_(50)
    m(batch())
    for t in (seen["q"], seen["k"]):
        assert t.shape == (4, 4, 32, 16)  # (B, heads, T, d_head): normalised over d_head
        assert torch.allclose(t.mean(-1), torch.zeros(()), atol=1e-5)
        assert torch.allclose(t.var(-1, correction=0), torch.ones(()), atol=5e-3)  # LayerNorm eps


def test_qk_fc_norm_normalises_proj_and_fc2_outputs():
    block = tiny("qk_fc_norm").blocks[0]
    assert isinstance(block.attn.post_norm, nn.LayerNorm) and isinstance(block.mlp.post_norm, nn.LayerNorm)
    assert isinstance(block.attn.q_norm, nn.LayerNorm)
    out = block.mlp(torch.randn(2, 8, 64) * 50)
    assert torch.allclose(out.var(-1, correction=0), torch.ones(()), atol=1e-3)


@pytest.mark.parametrize("variant,cap", [("softcap", 50.0), ("qk_norm_cap", 50.0), ("softcap", 2.0)])
def test_capped_logits_are_bounded(variant, cap):
    m = tiny(variant, softcap=cap)
    assert m.blocks[0].attn.softcap == cap
    q, k = torch.randn(2, 2, 4, 32, 16).unbind(0)
    z = attention_logits(q * 100, k * 100, cap)
    finite = z[torch.isfinite(z)]
    raw = attention_logits(q * 100, k * 100)
    assert raw[torch.isfinite(raw)].abs().max() > 10 * cap  # the cap really had work to do
    assert finite.abs().max() <= cap
    assert torch.isinf(z.triu(1)[..., 0, 1:]).all()  # causal mask still applied after capping


def test_fused_and_plain_attention_agree():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 32, 16).unbind(0)
    # No cap: SDPA (fused) against the reference that materialises logits.
    torch.testing.assert_close(attend(q, k, v), plain_attention(q, k, v), atol=1e-5, rtol=1e-4)
    # With a cap: FlexAttention's score_mod path against the reference. On CPU flex runs unfused,
    # but it evaluates the same score_mod and block mask the CUDA kernel is generated from.
    cap = 3.0
    flex = flex_capped_attention(q * 4, k * 4, v, cap, causal_block_mask(32, "cpu"), compiled=False)
    torch.testing.assert_close(flex, plain_attention(q * 4, k * 4, v, cap), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(flex, plain_attention(q * 4, k * 4, v))  # the cap changed the result


def test_mlra_parameter_count_and_head_rank():
    r, d, H = 3, 64, 4
    m = tiny("mlra", mlra_rank=r)
    proj = m.blocks[0].attn.qkv
    assert isinstance(proj, MLRAProjection)
    assert sum(p.numel() for p in proj.parameters()) == 3 * r * d * (H + 1) + 3 * d
    for which in range(3):
        for head in range(H):
            W = proj.head_weight(which, head)
            assert W.shape == (d, d // H)
            assert torch.linalg.matrix_rank(W) == r  # <= r, and exactly r for random factors
    # The effective weights are what the layer computes: head 1's q equals x @ A1 B1 + bias.
    x = torch.randn(2, 5, d)
    q1 = proj(x)[..., 16:32]
    torch.testing.assert_close(q1, x @ proj.head_weight(0, 1) + proj.bias[16:32])


def test_mlra_default_rank_matches_dense_parameter_count():
    cfg = TrialConfig(variant="mlra", **TINY).resolved()
    assert cfg.mlra_rank == 64 // 5
    assert 3 * cfg.mlra_rank * 64 * 5 <= 3 * 64 * 64 < 3 * (cfg.mlra_rank + 1) * 64 * 5


def test_sigma_reparam_effective_weight_has_spectral_norm_gamma():
    m = tiny("sigma_reparam")
    layers = [mod for mod in m.modules() if isinstance(mod, SigmaReparamLinear)]
    assert len(layers) == 4 * 2  # qkv, proj, fc1, fc2 in each block
    layer = layers[0]
    with torch.no_grad():
        layer.gamma.fill_(1.7)
    x = torch.randn(3, 64)
    for _ in range(100):  # one power-iteration step per training forward
        layer(x)
    sigma = torch.linalg.matrix_norm(layer.effective_weight().detach(), ord=2)
    assert sigma.item() == pytest.approx(1.7, rel=2e-3)
    # gamma is learnable; u, v get no gradient.
    assert layers[1].gamma.requires_grad and not layer.u.requires_grad


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_halves_its_loss_on_a_fixed_batch(variant):
    m = tiny(variant)
    idx = batch()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    _, first = m(idx[:, :-1], idx[:, 1:])
    for _ in range(50):
        _, loss = m(idx[:, :-1], idx[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() <= 0.5 * first.item(), (first.item(), loss.item())


def test_z_loss_and_final_softcap():
    idx = batch()
    plain_logits, _ = tiny()(idx)
    _, plain = tiny()(idx, idx)
    _, with_z = tiny(z_loss=1e-2)(idx, idx)
    lse = torch.logsumexp(plain_logits, -1)
    assert with_z.item() == pytest.approx(plain.item() + 1e-2 * lse.pow(2).mean().item(), rel=1e-5)
    m = tiny(final_softcap=0.5)
    with torch.no_grad():
        m.wte.weight.mul_(100)
    logits, _ = m(idx)
    assert logits.abs().max() <= 0.5


def reference_loss(h, weight, targets, vocab, z_loss=0.0, cap=0.0):
    """What autograd computes from whole logits: the behaviour linear_cross_entropy must match."""
    z = (h @ weight.t())[:, :vocab]
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    if cap:
        z = cap * torch.tanh(z / cap)
    loss = F.cross_entropy(z, targets)
    return loss + z_loss * torch.logsumexp(z, -1).pow(2).mean() if z_loss else loss


@pytest.mark.parametrize("z_loss,cap", [(0.0, 0.0), (1e-2, 0.0), (0.0, 2.0), (1e-3, 5.0)])
def test_chunked_linear_cross_entropy_matches_autograd(monkeypatch, z_loss, cap):
    monkeypatch.setattr(model_mod, "LOSS_CHUNK_ELEMENTS", 7 * 128)  # 7 tokens a chunk: 10 chunks
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(128, 16, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 97, (64,), generator=g)
    ref = reference_loss(h, w, t, 97, z_loss, cap)
    ref_dh, ref_dw = torch.autograd.grad(ref * 3.0, (h, w))
    out = linear_cross_entropy(h, w, t, 97, z_loss, cap)
    dh, dw = torch.autograd.grad(out * 3.0, (h, w))  # an upstream gradient other than 1
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dh, ref_dh, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-9, atol=1e-12)
    assert dw[97:].abs().max() == 0  # the padding rows never enter the loss


def test_chunked_linear_cross_entropy_under_bf16_autocast():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(48, 32, generator=g, requires_grad=True)
    w = (torch.randn(128, 32, generator=g) * 0.2).requires_grad_()
    t = torch.randint(0, 100, (48,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = reference_loss(h, w, t, 100)
        out = linear_cross_entropy(h, w, t, 100)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    for a, b in zip(torch.autograd.grad(out, (h, w)), torch.autograd.grad(ref, (h, w))):
        assert a.dtype == b.dtype == torch.float32
        assert ((a - b).norm() / b.norm()).item() < 1e-2  # bf16 matmul operands


def test_training_keeps_no_tokens_by_vocab_tensor_for_backward():
    """The fp32 logits (and their gradient) of every token are the largest tensors of a GPT-2
    step: 13 GB each at rybakov_gpu's shape. Nothing of that size may be saved for backward."""
    m = tiny(vocab_size=300)
    idx = batch(B=4, T=32, V=300)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = m(idx, idx)
    loss.backward()
    assert saved and max(saved) < 4 * 32 * 300  # tokens x vocab


def test_the_vocabulary_is_padded_to_a_multiple_of_128_and_the_padding_is_never_used():
    assert [padded_vocab(n) for n in (1, 128, 129, 257, 50257)] == [128, 128, 256, 384, 50304]
    m = tiny()  # vocab 97
    assert m.wte.weight.shape[0] == m.lm_head.weight.shape[0] == 128
    logits, _ = m(batch())
    assert logits.shape[-1] == 97
    assert m.token_embedding().shape == (97, 64)
    _, loss = m(batch(), batch())
    loss.backward()
    assert m.wte.weight.grad[97:].abs().max() == 0 and m.wte.weight.grad[:97].abs().max() > 0


def test_sigma_reparam_trains_under_bf16_autocast_with_sigma_in_fp32():
    layer = tiny("sigma_reparam").blocks[0].mlp.fc1
    x = torch.randn(4, 64, requires_grad=True)
    fp32 = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        sigma = layer.sigma()
    assert out.dtype == torch.bfloat16 and sigma.dtype == torch.float32
    assert layer.u.dtype == layer.v.dtype == torch.float32
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all() and layer.gamma.grad is not None
    torch.testing.assert_close(out.float(), fp32.detach(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("softcap", [0.0, 3.0])
@pytest.mark.parametrize("autocast", [False, True])
def test_attention_takes_fp32_q_k_beside_a_bf16_v(softcap, autocast):
    """What CUDA autocast hands attention under qk_norm: LayerNorm runs in fp32 there, so q and
    k arrive in fp32 beside the projection's bf16 v. Forward and backward must run, in one dtype."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 4, 32, 16, generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(2, 4, 32, 16, generator=g).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = attend(q, k, v, softcap)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    ref = attend(q.detach().double(), k.detach().double(), v.detach().double(), softcap)
    torch.testing.assert_close(y.double(), ref, rtol=3e-2, atol=3e-2)


def test_flex_attention_takes_mixed_dtypes_and_its_mask_is_an_input_of_the_compiled_graph():
    """The FlexAttention path (CUDA; on the CPU forward only, it has no backward there) with
    fp32 q, k and a bf16 v. And the BlockMask is built once, outside the graph: the compiled
    model reads it as inputs instead of tracing its construction into every forward."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 4, 32, 16, generator=g) for _ in range(2))
    v = torch.randn(2, 4, 32, 16, generator=g).bfloat16()
    mask = causal_block_mask(32, "cpu")
    y = attend(q, k, v, 3.0, mask)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), plain_attention(q, k, v.float(), 3.0), rtol=3e-2, atol=3e-2)

    m = tiny("softcap").requires_grad_(False).eval()
    m.set_block_mask(mask)
    explained = torch._dynamo.explain(m)(batch())
    inputs = [n.name for graph in explained.graphs for n in graph.graph.nodes if n.op == "placeholder"]
    assert explained.graph_break_count == 0
    assert any("block_mask" in name for name in inputs), inputs


def test_variants_compose():
    m = tiny("mlra", softcap=30.0, sigma_reparam=True)
    assert isinstance(m.blocks[0].attn.qkv, MLRAProjection)
    assert isinstance(m.blocks[0].attn.qkv.down, SigmaReparamLinear)
    assert m.blocks[0].attn.softcap == 30.0
    _, loss = m(batch(), batch())
    loss.backward()
    assert torch.isfinite(loss)


def init_norms(variant="baseline", **kw) -> dict:
    """Per-layer output norms at initialisation, on one fixed batch, 4 layers x width 128."""
    torch.manual_seed(0)
    m = GPT(TrialConfig(variant=variant, vocab_size=257, n_layer=4, d_model=128, n_head=4, seq_len=64, **kw))
    stats = {}
    with torch.no_grad():
        m(batch(B=8, T=64, V=257), None, stats)
    return {k: v.item() for k, v in stats.items() if "/out_norm_" in k}


def test_mlra_starts_with_the_dense_projections_scale():
    """Each factor at N(0, 0.02²) makes W = A·B 0.02²·√r in std: MLRA's QKV output started at
    0.1x the baseline's, its attention logits 40-200x smaller, a confound of every comparison.
    Matched (the default), W has the dense std, and every output norm is within 1.25x."""
    m = tiny("mlra", mlra_rank=8)
    heads = torch.stack([m.blocks[0].attn.qkv.head_weight(w, h) for w in range(3) for h in range(4)])
    assert heads.std().item() == pytest.approx(0.02, rel=0.1)
    base, matched, factors = init_norms(), init_norms("mlra"), init_norms("mlra", mlra_init="factors")
    assert all(0.8 < matched[k] / base[k] < 1.25 for k in base), {k: matched[k] / base[k] for k in base}
    assert all(factors[k] / base[k] < 0.2 for k in base if "qkv" in k)  # the old init, still selectable


def test_sigma_reparam_starts_as_the_dense_layer_it_replaces():
    """gamma = 1 cancelled GPT-2's init scale (0.02, and 1/sqrt(2L) on the residual projections):
    out_norm_proj started at 10-21x the baseline's. Matched, gamma = sigma(W) at init."""
    m = tiny("sigma_reparam")
    for layer in (mod for mod in m.modules() if isinstance(mod, SigmaReparamLinear)):
        torch.testing.assert_close(layer.effective_weight(), layer.weight, rtol=1e-3, atol=1e-6)
    base, matched, one = (
        init_norms(),
        init_norms("sigma_reparam"),
        init_norms("sigma_reparam", sigma_reparam_gamma="one"),
    )
    assert all(0.8 < matched[k] / base[k] < 1.25 for k in base), {k: matched[k] / base[k] for k in base}
    assert max(one[k] / base[k] for k in base if "proj" in k) > 5  # the old init, still selectable


def test_evaluation_computes_the_loss_alone():
    """Without grad (evaluation) the chunked loss runs one matmul a chunk, not the three that
    also give the gradients: autograd.Function's needs_input_grad is True under no_grad too."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
            return func(*args, **(kwargs or {}))

    h = torch.randn(64, 16, requires_grad=True)
    w = torch.randn(128, 16, requires_grad=True)
    t = torch.randint(0, 97, (64,))
    counts = {}
    for grad in (True, False):
        with torch.set_grad_enabled(grad), CountMatmuls() as mode:
            linear_cross_entropy(h, w, t, 97)
        counts[grad] = mode.n
    assert counts == {True: 3, False: 1}
