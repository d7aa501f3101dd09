"""Flax (linen) models used by the experiments, tests and benchmarks.

All models take NHWC float input ``(B, H, W, C)`` and return logits ``(B, num_classes)``.
Sub-modules have explicit, readable names (``conv1``, ``fc1``, ...) so that parameter paths
such as ``params/conv1/kernel`` can be selected by regex and Grad-CAM layers chosen by name.
The ReLU after a convolution is a parameter-free module too (``conv1_relu``), so that the
post-activation feature maps, the usual Grad-CAM layer, can be chosen by name.
Models with batch norm take ``train: bool`` (default ``False``: inference statistics); their
running statistics use momentum 0.9 (``bn_momentum``), not flax's 0.99, because the embedded
data set gives only a few hundred steps: with 0.99 the inference statistics still lag the
training ones after 240 steps (ResNetSmall: 98 % train, 46 % validation accuracy).

>>> import jax, jax.numpy as jnp
>>> model = LeNet()
>>> params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
>>> model.apply(params, jnp.zeros((2, 28, 28, 1))).shape
(2, 10)
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxplain.models._layers import avg_pool_2x2 as avg_pool_2x2
from jaxplain.models._layers import max_pool_2x2 as max_pool_2x2

__all__ = [
    "ReLU", "LeNet", "CNN003", "SmallCNN", "SmallVGG", "BasicBlock", "ResNet", "ResNet18",
    "ResNetSmall", "max_pool_2x2", "avg_pool_2x2",
]


class ReLU(nn.Module):
  """ReLU as a (parameter-free) module, so that post-activation feature maps have a name
  (``conv3_relu``) for Grad-CAM, interception and capture; parameter paths are unchanged."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.relu(x)


class LeNet(nn.Module):
  """LeNet-5 (seed 001) for 28x28 inputs: conv1 6@5x5 (same) - pool - conv2 16@5x5 (valid) -
  pool - fc1 120 - fc2 84 - fc3 ``num_classes``, ReLU activations, 2x2 max pools."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = ReLU(name="conv1_relu")(nn.Conv(6, (5, 5), padding="SAME", name="conv1")(x))
    x = max_pool_2x2(x)
    x = ReLU(name="conv2_relu")(nn.Conv(16, (5, 5), padding="VALID", name="conv2")(x))
    x = max_pool_2x2(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(120, name="fc1")(x))
    x = nn.relu(nn.Dense(84, name="fc2")(x))
    return nn.Dense(self.num_classes, name="fc3")(x)


class CNN003(nn.Module):
  """The seed-003 rock-paper-scissors CNN: three stages of two 3x3 convs (ReLU) and a 2x2 max
  pool, then an MLP with two hidden layers. ``widths``/``hidden`` default to the seed's
  (32, 64 | 128, 128 | 256, 256; 1024, 512); pass smaller ones for small inputs. Input H and
  W must be divisible by 8."""
  num_classes: int = 3
  widths: Sequence[int] = (32, 64, 128, 128, 256, 256)
  hidden: Sequence[int] = (1024, 512)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if len(self.widths) != 6:
      raise ValueError(f"CNN003: widths must have 6 entries, got {self.widths}")
    for i, w in enumerate(self.widths):
      x = nn.Conv(w, (3, 3), padding="SAME", name=f"conv{i + 1}")(x)
      x = ReLU(name=f"conv{i + 1}_relu")(x)
      if i % 2 == 1:
        x = max_pool_2x2(x)
    x = x.reshape(x.shape[0], -1)
    for i, h in enumerate(self.hidden):
      x = nn.relu(nn.Dense(h, name=f"fc{i + 1}")(x))
    return nn.Dense(self.num_classes, name=f"fc{len(self.hidden) + 1}")(x)


class SmallCNN(nn.Module):
  """The benchmark CNN for 32x32x3 inputs: conv1 32 - conv2 64 - pool - conv3 128 - pool -
  fc1 256 - fc2 ``num_classes`` (3x3 convs, ReLU)."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = ReLU(name="conv1_relu")(nn.Conv(32, (3, 3), padding="SAME", name="conv1")(x))
    x = ReLU(name="conv2_relu")(nn.Conv(64, (3, 3), padding="SAME", name="conv2")(x))
    x = max_pool_2x2(x)
    x = ReLU(name="conv3_relu")(nn.Conv(128, (3, 3), padding="SAME", name="conv3")(x))
    x = max_pool_2x2(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(256, name="fc1")(x))
    return nn.Dense(self.num_classes, name="fc2")(x)


class SmallVGG(nn.Module):
  """A small VGG: stages of (conv3x3 - batch norm - ReLU) x ``convs_per_stage`` then a 2x2 max
  pool, then a dense classifier. Input H, W divisible by 2 ** len(widths)."""
  num_classes: int = 10
  widths: Sequence[int] = (32, 64, 128)
  convs_per_stage: int = 2
  hidden: int = 256
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    k = 0
    for s, w in enumerate(self.widths):
      for _ in range(self.convs_per_stage):
        k += 1
        x = nn.Conv(w, (3, 3), padding="SAME", use_bias=False, name=f"conv{k}")(x)
        x = nn.BatchNorm(not train, momentum=self.bn_momentum, name=f"bn{k}")(x)
        x = ReLU(name=f"conv{k}_relu")(x)
      x = max_pool_2x2(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
    return nn.Dense(self.num_classes, name="fc2")(x)


class BasicBlock(nn.Module):
  """ResNet basic block: conv-bn-relu-conv-bn + (projected) skip, then ReLU."""
  features: int
  strides: int = 1
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = nn.Conv(self.features, (3, 3), strides=self.strides, padding="SAME", use_bias=False,
                name="conv1")(x)
    y = nn.relu(nn.BatchNorm(not train, momentum=self.bn_momentum, name="bn1")(y))
    y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, name="conv2")(y)
    y = nn.BatchNorm(not train, momentum=self.bn_momentum, name="bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), strides=self.strides, use_bias=False,
                  name="proj_conv")(x)
      x = nn.BatchNorm(not train, momentum=self.bn_momentum, name="proj_bn")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """CIFAR-style ResNet (3x3 stem, no stem pool), basic blocks, global average pool, dense
  head. ``stages`` blocks per stage, ``widths`` channels per stage (stride 2 from stage 2)."""
  num_classes: int = 10
  stages: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.Conv(self.widths[0], (3, 3), padding="SAME", use_bias=False, name="stem_conv")(x)
    x = nn.relu(nn.BatchNorm(not train, momentum=self.bn_momentum, name="stem_bn")(x))
    for s, (n, w) in enumerate(zip(self.stages, self.widths)):
      for b in range(n):
        strides = 2 if (s > 0 and b == 0) else 1
        x = BasicBlock(w, strides, self.bn_momentum, name=f"stage{s + 1}_block{b + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


def ResNet18(num_classes: int = 10) -> ResNet:
  """ResNet18: (2, 2, 2, 2) basic blocks, widths 64-128-256-512."""
  return ResNet(num_classes=num_classes)


def ResNetSmall(num_classes: int = 10) -> ResNet:
  """A small ResNet for tests and CPU experiments: (1, 1, 1) blocks, widths 8-16-32."""
  return ResNet(num_classes=num_classes, stages=(1, 1, 1), widths=(8, 16, 32))
