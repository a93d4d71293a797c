"""ResNet-20 on CIFAR-10 (the JPEG archive), int8 training with DSGC and DCLR.

SGD with Nesterov momentum 0.9, learning rate 0.1 per 128 images with cosine decay to 0 over 200 epochs,
weight decay 5e-4, batch 128, pad-crop and flip augmentation. Compare precisions with
--config.precision=fp32 / bf16 on the same data.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = 'resnet20'
  config.precision = 'int8'
  config.batch_size = 128
  config.num_epochs = 200
  config.optimizer.learning_rate = 0.1
  config.optimizer.schedule = 'cosine'
  config.optimizer.weight_decay = 5e-4
  return config
