"""MobileNetV2 (CIFAR strides, depthwise convs) on CIFAR-10, int8 with DSGC and DCLR.

The recipe of configs/resnet.py (200 epochs, batch 128, SGD, cosine) with this model.
"""

from configs import resnet


def get_config():
  config = resnet.get_config()
  config.model = 'mobilenet_v2'
  # DCLR stays on as in the paper, but on the 40-epoch recipe it cost int8 MobileNetV2 0.35-0.48 points in both
  # seeds tried and made its early test accuracy swing (docs/results.md): --config.int8.dclr=False drops it.
  # On 100 epochs at batch 512 the default int8 run collapsed once (seed 0, epoch 16) and trained on seed 1; with
  # --config.int8.depthwise_channel_clips=True both seeds trained (88.96%, 88.58%; fp32 89.08%, 89.32%), but four
  # other int8 variants also passed seed 0's collapse and the clips did not stop a mid-run dip on seed 1, so they
  # stay off by default (docs/results.md).
  return config
