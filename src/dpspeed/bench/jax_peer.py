"""The JAX peer of `dpspeed bench --peers jax` (seed 001's "native JAX" column): DP-SGD through
jax-privacy's clipped gradient on a Flax ViT of the timm model's configuration, and non-private JAX
training of the same model beside it, each step compiled once by XLA.

Physical batches have a fixed shape: a Poisson batch smaller than it is padded and its padding rows
masked (`is_padding_example`: they contribute nothing), so one compiled step serves every batch. The
compilation is timed apart from the steps (seed Fig. A.1). Like the PyTorch setups' throughput, a
physical step is forward, backward and (DP) clipping with accumulation; the noise and the update,
once per logical batch, are not in it. Only timm VisionTransformers of the plain kind (a class token
or average pooling, no register tokens, no layer scale) have a Flax twin here; other models are
skipped with one logged line, as is the whole peer where JAX, Flax, optax or jax-privacy is absent.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

PACKAGES = ("jax", "flax", "optax", "jax_privacy")
LABELS = ("jax-non-private", "jax-dp")
#: the JAX matmul precision of each bench precision (bf16 computes in bfloat16 from float32 weights)
MATMUL_PRECISION = {"fp32": "float32", "tf32": "tensorfloat32", "bf16": "default"}


def missing() -> list[str]:
    """The packages the peer needs that are not installed."""
    return [name for name in PACKAGES if importlib.util.find_spec(name) is None]


@dataclass(frozen=True)
class ViTConfig:
    image_size: int
    patch: int
    width: int
    depth: int
    heads: int
    hidden: int
    classes: int
    class_token: bool
    qkv_bias: bool
    eps: float


def vit_config(model: nn.Module) -> ViTConfig | str:
    """The configuration of a plain timm VisionTransformer, or why it has no Flax twin here."""
    if type(model).__name__ != "VisionTransformer":
        return f"{type(model).__name__} is not a timm VisionTransformer"
    block = model.blocks[0]
    plain = (model.num_reg_tokens == 0 and not model.no_embed_class and type(block.ls1).__name__ == "Identity"
             and type(model.norm_pre).__name__ == "Identity" and type(block.attn.q_norm).__name__ == "Identity"
             and (model.global_pool, model.cls_token is not None) in (("token", True), ("avg", False)))
    if not plain:
        return "only plain ViTs (class token or average pooling, no register tokens, no layer scale) have a Flax twin"
    size, patch = model.patch_embed.img_size, model.patch_embed.patch_size
    return ViTConfig(size[0], patch[0], model.embed_dim, len(model.blocks), block.attn.num_heads,
                     block.mlp.fc1.out_features, model.num_classes, model.cls_token is not None,
                     block.attn.qkv.bias is not None, model.norm.eps)


def flax_vit(config: ViTConfig):
    """A Flax module computing what timm's ViT of `config` computes (pre-norm blocks, exact GELU)."""
    import flax.linen as fnn
    import jax
    import jax.numpy as jnp

    class Block(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            b, n, d = x.shape
            h = fnn.LayerNorm(epsilon=config.eps)(x)
            qkv = fnn.Dense(3 * d, use_bias=config.qkv_bias)(h).reshape(b, n, 3, config.heads, d // config.heads)
            q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
            attention = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) * (d // config.heads) ** -0.5, axis=-1)
            x = x + fnn.Dense(d)((attention @ v).transpose(0, 2, 1, 3).reshape(b, n, d))
            h = fnn.Dense(config.hidden)(fnn.LayerNorm(epsilon=config.eps)(x))
            return x + fnn.Dense(d)(jax.nn.gelu(h, approximate=False))

    class ViT(fnn.Module):
        @fnn.compact
        def __call__(self, images):  # (B, H, W, C)
            p, d = config.patch, config.width
            x = fnn.Conv(d, (p, p), strides=(p, p), padding="VALID")(images)
            x = x.reshape(x.shape[0], -1, d)
            if config.class_token:
                token = self.param("cls_token", fnn.initializers.normal(1e-6), (1, 1, d))
                x = jnp.concatenate([jnp.broadcast_to(token, (x.shape[0], 1, d)).astype(x.dtype), x], axis=1)
            x = x + self.param("pos_embed", fnn.initializers.normal(0.02), (1, x.shape[1], d)).astype(x.dtype)
            for _ in range(config.depth):
                x = Block()(x)
            x = fnn.LayerNorm(epsilon=config.eps)(x)
            return fnn.Dense(config.classes)(x[:, 0] if config.class_token else x.mean(1))

    return ViT()


def parameter_count(params: Any) -> int:
    import jax

    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


class JaxSteps:
    """Compiled physical steps of one label ("jax-non-private" or "jax-dp") and precision: the sum
    of (clipped, for DP) per-example gradients of a batch, added to an accumulator."""

    def __init__(self, config: ViTConfig, label: str, precision: str, max_grad_norm: float = 1.0, seed: int = 0):
        import jax

        self.label, self.precision = label, precision
        self.model = flax_vit(config)
        shape = (1, config.image_size, config.image_size, 3)
        self.params = self.model.init(jax.random.PRNGKey(seed), np.zeros(shape, np.float32))["params"]
        self.accumulated = jax.tree.map(lambda p: np.zeros(p.shape, np.float32), self.params)
        self.max_grad_norm = max_grad_norm
        self._compiled: dict[int, Callable] = {}
        self.compile_seconds: dict[int, float] = {}

    def _loss(self, params, images, labels):
        import jax
        import jax.numpy as jnp
        import optax

        if self.precision == "bf16":
            params, images = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params), images.astype(jnp.bfloat16)
        logits = self.model.apply({"params": params}, images).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()

    def _step(self) -> Callable:
        import jax
        import jax.numpy as jnp
        import jax_privacy

        if self.label == "jax-dp":
            clipped = jax_privacy.clipped_grad(self._loss, l2_clip_norm=self.max_grad_norm, batch_argnums=(1, 2),
                                               dtype=jnp.float32)

            def step(params, accumulated, images, labels, padding):
                grads = clipped(params, images, labels, is_padding_example=padding)
                return jax.tree.map(jnp.add, accumulated, grads)
        else:
            def step(params, accumulated, images, labels, padding):
                grads = jax.grad(self._loss)(params, images, labels)
                return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), accumulated, grads)
        return step

    def compiled(self, batch: int, images: Any, labels: Any, padding: Any) -> Callable:
        """The step for physical batches of `batch` rows, compiled at its first use (timed)."""
        import jax

        if batch not in self._compiled:
            start = time.perf_counter()
            with jax.default_matmul_precision(MATMUL_PRECISION[self.precision]):
                lowered = jax.jit(self._step()).lower(self.params, self.accumulated, images, labels, padding)
                self._compiled[batch] = lowered.compile()
            self.compile_seconds[batch] = time.perf_counter() - start
        return self._compiled[batch]

    def step(self, images: np.ndarray, labels: np.ndarray, padding: np.ndarray | None = None) -> None:
        """One physical batch (NHWC images), its padding rows (True) contributing nothing."""
        import jax.numpy as jnp

        padding = np.zeros(len(labels), bool) if padding is None else padding
        images, labels, padding = jnp.asarray(images), jnp.asarray(labels), jnp.asarray(padding)
        run = self.compiled(len(labels), images, labels, padding)
        self.accumulated = run(self.params, self.accumulated, images, labels, padding)
        for leaf in _leaves(self.accumulated):  # JAX dispatches asynchronously: the step ends here
            leaf.block_until_ready()


def _leaves(tree: Any) -> list:
    import jax

    return jax.tree.leaves(tree)


def throughput(steps: JaxSteps, images: np.ndarray, labels: np.ndarray, repeats: int, warmup: int) -> dict:
    """Examples per second over physical batches, as timing.throughput gives them for PyTorch, and
    the seconds the step took to compile (not in the throughput)."""
    from .timing import quartiles

    for _ in range(max(warmup, 1)):  # the first step compiles
        steps.step(images, labels)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        steps.step(images, labels)
        seconds.append(time.perf_counter() - start)
    q1, median, q3 = quartiles(seconds)
    batch = len(labels)
    return {"batch": batch, "seconds": seconds, "seconds_median": median, "spread": (q3 - q1) / median,
            "per_second": batch / median, "per_second_q1": batch / q3, "per_second_q3": batch / q1,
            "compile_seconds": steps.compile_seconds[batch]}


def as_numpy(x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """A bench batch for JAX: images NCHW -> NHWC."""
    return x.permute(0, 2, 3, 1).cpu().numpy(), y.cpu().numpy()
