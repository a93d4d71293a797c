"""jint8: unified INT8 training of convolutional networks in JAX/Flax.

``jint8.nn`` makes Flax models int8 (``Int8Model``, ``Int8ConvGeneralDilated``, ``Int8DotGeneral``);
``jint8.optim`` composes DSGC and DCLR with any optax optimizer; ``jint8.quant`` holds the quantization math;
``jint8.pallas`` the GPU kernels. This library needs only jax, flax and optax. The application built on it
(``jint8.training``, its tasks ``jint8.classification`` and ``jint8.detection``, ``train.py``) needs the
``[train]`` extra.
"""

from jint8 import nn, ops, optim, quant

__version__ = '0.1.0'
