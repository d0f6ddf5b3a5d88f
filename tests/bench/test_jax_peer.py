"""The JAX peer: its Flax ViT is timm's (same parameters, same function given the same weights), its
DP step sums per-example gradients each clipped to R with padding rows contributing nothing, and
`--peers jax` runs beside the PyTorch setups, or is skipped with one line where JAX is absent."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
pytest.importorskip("jax_privacy")
timm = pytest.importorskip("timm")

import jax.numpy as jnp  # noqa: E402

from dpspeed.bench import jax_peer  # noqa: E402
from dpspeed.bench.study import BenchConfig, Study  # noqa: E402


def _tiny_vit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=10, **kwargs).eval()


def _timm_weights(model) -> dict:
    """timm's weights in the Flax model's layout."""
    def t(p):
        return jnp.asarray(p.detach().numpy())

    def dense(linear):
        return {"kernel": t(linear.weight.T), **({"bias": t(linear.bias)} if linear.bias is not None else {})}

    def norm(layer):
        return {"scale": t(layer.weight), "bias": t(layer.bias)}

    params = {"Conv_0": {"kernel": t(model.patch_embed.proj.weight.permute(2, 3, 1, 0)),
                         "bias": t(model.patch_embed.proj.bias)},
              "cls_token": t(model.cls_token), "pos_embed": t(model.pos_embed),
              "LayerNorm_0": norm(model.norm), "Dense_0": dense(model.head)}
    for i, block in enumerate(model.blocks):
        params[f"Block_{i}"] = {"LayerNorm_0": norm(block.norm1), "Dense_0": dense(block.attn.qkv),
                                "Dense_1": dense(block.attn.proj), "LayerNorm_1": norm(block.norm2),
                                "Dense_2": dense(block.mlp.fc1), "Dense_3": dense(block.mlp.fc2)}
    return params


def test_the_flax_twin_is_the_timm_model():
    model = _tiny_vit()
    config = jax_peer.vit_config(model)
    steps = jax_peer.JaxSteps(config, "jax-dp", "fp32")
    assert jax_peer.parameter_count(steps.params) == sum(p.numel() for p in model.parameters())
    weights = _timm_weights(model)
    assert jax.tree.map(jnp.shape, weights) == jax.tree.map(jnp.shape, steps.params)
    x = torch.randn(3, 3, 32, 32)
    images, _ = jax_peer.as_numpy(x, torch.zeros(3))
    ours = np.asarray(steps.model.apply({"params": weights}, images))
    np.testing.assert_allclose(ours, model(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_models_without_a_twin_are_named():
    assert "not a timm VisionTransformer" in jax_peer.vit_config(torch.nn.Linear(2, 2))
    assert "register tokens" in jax_peer.vit_config(_tiny_vit(reg_tokens=2))


def test_the_dp_step_sums_per_example_gradients_clipped_to_r_and_skips_padding():
    """Against the one-example loop with jax.grad: each example's gradient clipped to R, summed; a
    padding row contributes nothing whatever it holds."""
    steps = jax_peer.JaxSteps(jax_peer.vit_config(_tiny_vit()), "jax-dp", "fp32", max_grad_norm=0.05)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((4, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 4)
    padding = np.array([False, False, True, False])
    steps.step(images, labels, padding)

    want = jax.tree.map(jnp.zeros_like, steps.params)
    norms = []
    for i in np.flatnonzero(~padding):
        grad = jax.grad(steps._loss)(steps.params, images[i : i + 1], labels[i : i + 1])
        norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grad))))
        norms.append(norm)
        want = jax.tree.map(lambda w, g: w + g * min(1.0, 0.05 / norm), want, grad)
    assert min(norms) > 0.05  # every real example was clipped: the test can tell clipped from not
    for got, expected in zip(jax.tree.leaves(steps.accumulated), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-6)


def test_peers_jax_runs_beside_the_pytorch_setups(tmp_path):
    config = BenchConfig(models=["timm:vit_tiny_patch16_224"], image_size=32, modes=["bk"], peers=["jax"],
                         max_batch=4, min_batch=4, repeats=2, warmup=1, memory_styles=["all-layer"],
                         out=str(tmp_path))
    results = Study(config, show_progress=False).run()
    rows = {r["setup"]: r for r in results["throughput"]}
    assert set(rows) == {"non-private", "bk", "jax-non-private", "jax-dp"}
    assert rows["jax-dp"]["per_second"] > 0 and rows["jax-dp"]["compile_seconds"] > 0
    assert not any(r["mode"].startswith("jax") for r in results["recommendation"])
    from dpspeed.bench.report import build

    assert "## JAX: compilation apart from the steps" in build(results, tmp_path).read_text()


def test_peers_jax_without_jax_is_skipped_with_one_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(jax_peer, "missing", lambda: ["jax_privacy"])
    config = BenchConfig(models=["mlp"], image_size=8, modes=["bk"], peers=["jax"], max_batch=4, repeats=1,
                         warmup=1, memory_styles=["all-layer"], out=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        results = Study(config, show_progress=False).run()
    assert "--peers jax: skipped, jax_privacy not installed" in caplog.text
    assert {r["setup"] for r in results["throughput"]} == {"non-private", "bk"}
