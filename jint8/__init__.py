"""jint8: unified INT8 training of convolutional networks in JAX/Flax.

``jint8.nn`` makes Flax models int8 (``Int8Model``, ``Int8ConvGeneralDilated``, ``Int8DotGeneral``) and runs a
train step in the trace it needs (``search_cond``: DSGC searches every ``period`` steps); ``jint8.nnx`` does the same
for Flax NNX models (``to_int8``, the state as ``Int8State`` variables, ``update_state``); ``jint8.state`` owns the
layers' quantization state (``update`` writes what the backward passes report); ``jint8.optim`` composes DCLR
with any optax optimizer; ``jint8.quant`` holds the quantization math; ``jint8.pallas`` the GPU kernels. This
library needs only jax, flax and optax. The application built on it (``jint8.training``, its tasks
``jint8.classification`` and ``jint8.detection``, ``train.py``) needs the ``[train]`` extra.
"""

from jint8 import nn, nnx, ops, optim, quant, state

__version__ = '0.1.0'
