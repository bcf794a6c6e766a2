"""Probes measure what their definitions say."""

import pytest
import torch

from tunestab.config import TrialConfig
from tunestab.model import GPT
from tunestab.probes import LAYER_METRICS, grad_variance, layer_metrics, model_probes, tev


def test_tev_matches_the_definition_computed_independently():
    g = torch.Generator().manual_seed(0)
    E = torch.randn(50, 12, generator=g) * torch.linspace(0.1, 3, 50).unsqueeze(1) + 5
    per_row = []
    for row in E.tolist():  # plain Python: population std of each row's d entries
        mean = sum(row) / len(row)
        per_row.append((sum((x - mean) ** 2 for x in row) / len(row)) ** 0.5)
    mu = sum(per_row) / len(per_row)
    sigma = (sum((t - mu) ** 2 for t in per_row) / len(per_row)) ** 0.5
    got_mu, got_sigma = tev(E)
    assert got_mu.item() == pytest.approx(mu, rel=1e-5)
    assert got_sigma.item() == pytest.approx(sigma, rel=1e-4)


def test_tev_at_gpt2_initialisation():
    m = GPT(TrialConfig(vocab_size=512, d_model=256, n_head=4, n_layer=1, seq_len=16))
    mu, sigma = tev(m.wte.weight)
    assert mu.item() == pytest.approx(0.02, rel=0.02)
    assert sigma.item() < 0.002  # only sampling noise of the std of 256 entries


def _probed_step(variant="baseline", **kw):
    torch.manual_seed(0)
    m = GPT(TrialConfig(variant=variant, vocab_size=97, n_layer=3, d_model=32, n_head=2, seq_len=16, **kw))
    idx = torch.randint(0, 97, (2, 16))
    stats = {}
    _, loss = m(idx, idx, stats)
    loss.backward()
    return m, idx, stats


def test_layer_metrics_report_every_layer_and_the_max():
    m, idx, stats = _probed_step()
    metrics = model_probes(m, stats, with_grad_var=True)
    for name in LAYER_METRICS:
        per_layer = [metrics[f"layer_{i}/{name}"] for i in range(3)]
        assert metrics[name] == torch.stack(per_layer).max()
    for name in ("tev_mean", "tev_std", "grad_var_embed"):
        assert torch.isfinite(metrics[name])
    # grad_var_embed only when asked for.
    assert "grad_var_embed" not in model_probes(m, stats, with_grad_var=False)


def test_output_norms_and_logit_max_are_what_the_layers_produce():
    m, idx, stats = _probed_step()
    captured = {}
    block = m.blocks[1]
    block.attn.qkv.register_forward_hook(lambda mod, i, o: captured.__setitem__("qkv", o))
    block.mlp.fc2.register_forward_hook(lambda mod, i, o: captured.__setitem__("fc2", o))
    block.attn.q_norm.register_forward_hook(lambda mod, i, o: captured.__setitem__("q", o))
    block.attn.k_norm.register_forward_hook(lambda mod, i, o: captured.__setitem__("k", o))
    stats = {}
    m(idx, None, stats)
    assert stats["layer_1/out_norm_qkv"] == pytest.approx(captured["qkv"].norm(dim=-1).mean().item(), rel=1e-5)
    assert stats["layer_1/out_norm_fc2"] == pytest.approx(captured["fc2"].norm(dim=-1).mean().item(), rel=1e-5)
    q, k = captured["q"], captured["k"]
    z = (q @ k.transpose(-1, -2)) / 4.0  # sqrt(d_head=16)
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    assert stats["layer_1/attn_logit_max"] == pytest.approx(z.abs()[..., causal].max().item(), rel=1e-5)


def test_probing_does_not_change_the_step():
    m, idx, _ = _probed_step("qk_norm_cap")
    logits_plain, _ = m(idx)
    logits_probed, _ = m(idx, None, {})
    assert torch.equal(logits_plain, logits_probed)


def test_embedding_gradient_variance():
    m, _, _ = _probed_step()
    g = m.wte.weight.grad
    assert grad_variance(g).item() == pytest.approx(((g - g.mean()) ** 2).mean().item(), rel=1e-4)


def test_layer_metrics_leave_unrelated_keys_alone():
    out = layer_metrics({"layer_0/out_norm_fc1": torch.tensor(1.0), "layer_1/out_norm_fc1": torch.tensor(3.0)})
    assert out["out_norm_fc1"].item() == 3.0 and "out_norm_qkv" not in out


def test_probes_read_only_the_rows_of_real_tokens():
    """The vocabulary is padded to a multiple of 128 (97 -> 128): the padding rows are no token's
    embedding and must move neither TEV nor the gradient variance."""
    m, _, stats = _probed_step(probe_grad_var=True)
    with torch.no_grad():
        m.wte.weight[97:] = torch.randn(31, 32) * 100
    m.wte.weight.grad[97:] = 1e6
    got = model_probes(m, stats, with_grad_var=True)
    mu, sigma = tev(m.wte.weight[:97])
    assert got["tev_mean"].item() == mu.item() and got["tev_std"].item() == sigma.item()
    assert got["grad_var_embed"].item() == pytest.approx(grad_variance(m.wte.weight.grad[:97]).item(), rel=1e-6)


def test_the_per_step_tev_agrees_with_the_reported_one():
    from tunestab.probes import tev_rows

    g = torch.Generator().manual_seed(3)
    E = torch.randn(300, 64, generator=g) * torch.linspace(0.01, 1, 300).unsqueeze(1) + 0.05 * torch.randn(
        300, 1, generator=g
    )
    rows = tev_rows(E)
    for a, b in zip((rows.mean(), rows.std(correction=0)), tev(E)):
        assert a.item() == pytest.approx(b.item(), rel=1e-5)
