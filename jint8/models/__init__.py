"""Model zoo: plain Flax Linen CNNs built from ``nn.Conv``, ``nn.Dense`` and ``nn.BatchNorm``, and the CIFAR ResNets
also as Flax NNX modules (``create_nnx_model``).

Every model is called as ``model(x, train)`` on an NHWC batch, keeps BN statistics in the ``batch_stats``
collection (NNX: ``nnx.BatchStat`` variables), computes in ``dtype`` with float32 params and returns float32 logits,
so ``jint8.nn.Int8Model`` (NNX: ``jint8.nnx.to_int8``) converts any of them to int8 training without changes.
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from jint8.models.inception_v3 import InceptionV3Cifar
from jint8.models.mobilenet_v2 import MobileNetV2
from jint8.models.nnx_resnet_cifar import ResNetCifar as NnxResNetCifar
from jint8.models.resnet import ResNet, ResNetBackbone
from jint8.models.resnet_cifar import ResNetCifar
from jint8.models.vgg import VGG

_MODELS = {
    'resnet20': functools.partial(ResNetCifar, depth=20),
    'resnet56': functools.partial(ResNetCifar, depth=56),
    'resnet18': functools.partial(ResNet, depth=18),
    'resnet50': functools.partial(ResNet, depth=50),
    'mobilenet_v2': MobileNetV2,
    'vgg16_bn': functools.partial(VGG, depth=16),
    'inception_v3_cifar': InceptionV3Cifar,
}
MODEL_NAMES = tuple(_MODELS)
_NNX_MODELS = {
    'resnet20': functools.partial(NnxResNetCifar, depth=20),
    'resnet56': functools.partial(NnxResNetCifar, depth=56),
}
NNX_MODEL_NAMES = tuple(_NNX_MODELS)


def create_model(name: str, *, num_classes: int, dtype: Any = jnp.float32, **kwargs) -> nn.Module:
  """Builds the model ``name`` (one of ``MODEL_NAMES``); ``kwargs`` (e.g. ``width``) go to its constructor."""
  if name not in _MODELS:
    raise ValueError(f'unknown model {name!r}; valid names: {", ".join(MODEL_NAMES)}')
  return _MODELS[name](num_classes=num_classes, dtype=dtype, **kwargs)


def create_nnx_model(name: str, *, num_classes: int, dtype: Any = jnp.float32, rngs: nnx.Rngs, **kwargs
                     ) -> nnx.Module:
  """Builds the Flax NNX model ``name`` (one of ``NNX_MODEL_NAMES``) from ``rngs``; ``kwargs`` go to its
  constructor."""
  if name not in _NNX_MODELS:
    raise ValueError(f'unknown NNX model {name!r}; valid names: {", ".join(NNX_MODEL_NAMES)}')
  return _NNX_MODELS[name](num_classes=num_classes, dtype=dtype, rngs=rngs, **kwargs)


__all__ = ['MODEL_NAMES', 'NNX_MODEL_NAMES', 'create_model', 'create_nnx_model', 'InceptionV3Cifar', 'MobileNetV2',
           'NnxResNetCifar', 'ResNet', 'ResNetBackbone', 'ResNetCifar', 'VGG']
