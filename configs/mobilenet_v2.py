"""MobileNetV2 (CIFAR strides, depthwise convs) on CIFAR-10, int8 with DSGC and DCLR.

The recipe of configs/resnet.py (200 epochs, batch 128, SGD, cosine) with this model.
"""

from configs import resnet


def get_config():
  config = resnet.get_config()
  config.model = 'mobilenet_v2'
  # DCLR stays on as in the paper, but on the 40-epoch recipe it cost int8 MobileNetV2 0.35-0.48 points in both
  # seeds tried and made its early test accuracy swing (docs/results.md): --config.int8.dclr=False drops it.
  # On 100 epochs at batch 512 the default int8 run collapsed once (seed 0, epoch 16); with
  # --config.int8.depthwise_channel_clips=True the same seed trained to 88.96% (fp32 89.08%). One seed so far, and
  # four other int8 variants also passed that point, so it stays off by default (docs/results.md).
  return config
