"""ResNet-56 (CIFAR style) on CIFAR-10, int8 with DSGC and DCLR.

The recipe of configs/resnet.py (200 epochs, batch 128, SGD, cosine) with this model.
"""

from configs import resnet


def get_config():
  config = resnet.get_config()
  config.model = 'resnet56'
  return config
