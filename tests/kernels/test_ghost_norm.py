"""The fused ghost-norm kernel against the float64 one-example reference (on the CPU under
Triton's interpreter, on a GPU natively)."""

from __future__ import annotations

import pytest
import torch

from dpspeed.kernels import ghost_norm
from dpspeed.layers._gram import ghost_sq_norm, spread

pytestmark = pytest.mark.skipif(ghost_norm.triton is None, reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """||g_i^T a_i||_F^2 from each example's own weight gradient, in float64."""
    return torch.stack([(g[i].double().t() @ a[i].double()).square().sum() for i in range(len(a))])


# T not a multiple of the tile (197: a ViT's), one tile, several tiles, one position; d and p not
# multiples of the chunk
SHAPES = [(3, 197, 96, 160), (2, 17, 48, 48), (2, 1, 5, 7), (2, 130, 70, 33)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_the_kernel_equals_each_examples_own_weight_gradient_norm(shape, dtype):
    torch.manual_seed(0)
    batch, positions, d, p = shape
    a = torch.randn(batch, positions, d, device=DEVICE).to(dtype)
    g = torch.randn(batch, positions, p, device=DEVICE).to(dtype)
    norms, spreads = ghost_norm.ghost_sq_norm_and_spread(a, g)
    assert norms.dtype == spreads.dtype == torch.float32
    torch.testing.assert_close(norms.double().cpu(), _reference(a, g).cpu(), rtol=2e-5, atol=0)
    torch.testing.assert_close(spreads.cpu(), spread(a, g).cpu(), rtol=1e-5, atol=0)


def test_strided_operands_are_read_in_place():
    """A slice of a wider tensor (as kept activations may be) and a transposed batch layout."""
    torch.manual_seed(1)
    wide = torch.randn(3, 41, 2 * 72, device=DEVICE)
    a = wide[:, :, :72]
    g = torch.randn(41, 3, 56, device=DEVICE).transpose(0, 1)
    norms, _ = ghost_norm.ghost_sq_norm_and_spread(a, g)
    torch.testing.assert_close(norms.double().cpu(), _reference(a, g).cpu(), rtol=2e-5, atol=0)


def test_one_launch_takes_layers_of_different_widths_and_strides():
    """Every layer of one (B, T, dtype) in one launch, each read through its own row of the table:
    widths on both sides of the chunk, a strided slice, a transposed batch layout."""
    torch.manual_seed(2)
    wide = torch.randn(3, 41, 200, device=DEVICE)
    layers = [(torch.randn(3, 41, 70, device=DEVICE), torch.randn(3, 41, 33, device=DEVICE)),
              (wide[:, :, 100:172], torch.randn(41, 3, 56, device=DEVICE).transpose(0, 1)),
              (torch.randn(3, 41, 5, device=DEVICE), torch.randn(3, 41, 130, device=DEVICE))]
    norms, spreads = ghost_norm.ghost_sq_norms_and_spreads(layers)
    assert norms.shape == spreads.shape == (3, 3)
    for row, (a, g) in enumerate(layers):
        torch.testing.assert_close(norms[row].double().cpu(), _reference(a, g).cpu(), rtol=2e-5, atol=0)
        torch.testing.assert_close(spreads[row].cpu(), spread(a, g).cpu(), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="one number of positions"):
        ghost_norm.ghost_sq_norms_and_spreads([layers[0], (torch.randn(3, 40, 4), torch.randn(3, 40, 4))])


def test_an_empty_batch_gives_no_norms():
    a = torch.randn(0, 5, 4, device=DEVICE)
    norms, spreads = ghost_norm.ghost_sq_norm_and_spread(a, torch.randn(0, 5, 3, device=DEVICE))
    assert norms.shape == spreads.shape == (0,)


def test_a_cancelling_example_is_over_estimated_as_on_the_torch_path():
    """Terms that cancel (inputs s and 1.5 s, output gradients 1.5 and -1): the norm from the
    kernel, raised by the Gram allowance, bounds the float64 norm as the torch path's does."""
    scale = 2.0**10
    a = torch.tensor([[[scale] * 8, [1.5 * scale] * 8]], device=DEVICE).to(torch.bfloat16)
    g = torch.tensor([[[1.5] * 8, [-1.0] * 8]], device=DEVICE).to(torch.bfloat16)
    norms, spreads = ghost_norm.ghost_sq_norm_and_spread(a, g)
    from dpspeed.layers.precision import gram_error

    fused = norms + gram_error(torch.float32) * spreads.square()
    assert float(fused) >= float(_reference(a, g))
    torch.testing.assert_close(fused.cpu(), ghost_sq_norm(a.cpu(), g.cpu()), rtol=1e-3, atol=0)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("mode", ["bk", "bk-mix-ghost"])
def test_training_through_the_kernel_clips_as_the_torch_path(monkeypatch, mode, autocast):
    """The ghost-norm layers of a model, clipped with the kernel in the training path (on the CPU
    under the interpreter, standing in for a GPU): the same clipped sum as the torch path's, in
    float32 and from the 16-bit operands of bf16 autocast."""
    from torch import nn

    from dpspeed.testing import private_grads

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.Tanh(), nn.Linear(64, 48)).to(DEVICE)  # ghost is cheaper at T = 10
    x, y = torch.randn(6, 10, 48, device=DEVICE), torch.randn(6, 10, 48, device=DEVICE)

    def loss(m, b):
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16, enabled=autocast):
            out = m(b[0])
        return (out.float() - b[1]).square().sum()

    def clipped() -> dict[str, torch.Tensor]:
        grads, engine = private_grads(model, loss, (x, y), max_grad_norm=0.5, clipping_mode=mode,
                                      loss_reduction="sum")
        engine.detach()
        return grads

    torch_path = clipped()
    launches = []
    original = ghost_norm.ghost_sq_norms_and_spreads

    def counted(operands):
        launches.append(len(operands))
        return original(operands)

    monkeypatch.setenv(ghost_norm.ENABLE_VARIABLE, "1")  # the interpreter stands in for a GPU on the CPU
    monkeypatch.setattr(ghost_norm, "ghost_sq_norms_and_spreads", counted)
    kernel_path = clipped()
    assert launches == [2], "both layers' norms in one launch"
    for name in torch_path:
        torch.testing.assert_close(kernel_path[name], torch_path[name], rtol=1e-5, atol=1e-7)
