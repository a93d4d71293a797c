"""FCOS with a ResNet-18 backbone on BCCD blood-cell detection, int8 training with DSGC and DCLR.

  python train.py --config configs/detector.py                         # int8
  python train.py --config configs/detector.py --config.precision=fp32 # the float baseline
  python train.py --config configs/detector.py --config.dataset.format=coco --config.dataset.path=DIR  # COCO data
  python train.py --config configs/detector.py --config.dataset.path=DIR --config.dataset.class_names='()'  # VOC

Trained from scratch on the 205 training images (BCCD has no pretrained backbone here), 512x384 input,
horizontal and vertical flips, evaluated on the 87 validation images with COCO mAP@[.5:.95] and mAP@.5.
SGD with Nesterov momentum, 0.01 per 16 images, 3 warmup epochs then cosine decay, gradient norm clipped
at 10: 150 epochs of 12 steps.
"""

import ml_collections

from configs import default


def get_config():
  config = default.get_config()
  config.task = 'detection'  # train.py runs jint8.detection.trainer
  config.model = 'resnet18'  # the backbone: a name in jint8.detection.trainer.BACKBONES
  config.model_kwargs.width = 1.0

  # Detection data is a format and a path (jint8.detection.dataset) instead of classification's name and archive.
  del config.dataset.name, config.dataset.archive
  config.dataset.format = 'voc'  # 'voc': a PASCAL VOC root; 'coco': an annotation JSON per split and images
  # A folder or a .tar.gz; a file name alone is also looked for in $JINT8_DATA_DIR and ../shared/data.
  config.dataset.path = 'bccd-voc.tar.gz'
  # VOC: the classes in label order; () takes the training split's names, sorted. (COCO: its categories, by id.)
  config.dataset.class_names = ('RBC', 'WBC', 'Platelets')
  config.dataset.annotations = 'annotations/instances_{split}.json'  # COCO: each split's annotation file under path
  config.dataset.images = '{split}'  # COCO: each split's image folder under path, holding its file_names
  config.dataset.empty_images = 'keep'  # images without boxes: 'keep' (as negatives) or 'skip'
  config.dataset.image_size = (384, 512)  # (height, width), a multiple of the largest pyramid stride
  config.dataset.max_boxes = 40  # boxes per image after padding (BCCD has at most 30); 0: the data's most
  config.dataset.flips = ('horizontal', 'vertical')  # random flips in training (cells have no orientation)
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'val'

  config.fcos = ml_collections.ConfigDict()
  config.fcos.features = 128  # channels of the pyramid and the shared head
  config.fcos.head_convs = 4  # 3x3 conv + GroupNorm + ReLU per head tower
  config.fcos.groups = 32  # GroupNorm groups
  config.fcos.extra_levels = 0  # 0: P3-P5 (strides 8-32); BCCD's cells are 20-250 px
  config.fcos.size_boundaries = (64, 128)  # largest side distance regressed by each level: (0,64], (64,128], >128
  config.fcos.center_radius = 1.5  # positives within 1.5 strides of a box centre
  config.fcos.focal_alpha = 0.25
  config.fcos.focal_gamma = 2.0

  config.eval = ml_collections.ConfigDict()
  config.eval.top_k = 1000  # candidates per image before NMS
  config.eval.score_threshold = 0.05
  config.eval.nms_iou = 0.6
  config.eval.max_detections = 100  # per image, as COCO scores
  config.eval.draw_threshold = 0.3  # detections drawn in detections.png
  config.num_visualize = 6  # validation images in detections.png (0: none)

  config.precision = 'int8'
  # The head is shared by the pyramid levels, whose activations differ in range: the delayed clip averages their
  # maxima (jint8.state), so each application clips at its own max-abs instead.
  config.int8.input_clip = 'maxabs'
  config.optimizer.name = 'sgd'
  config.optimizer.kwargs = ml_collections.ConfigDict({'momentum': 0.9, 'nesterov': True})
  config.optimizer.learning_rate = 0.01
  config.optimizer.base_batch_size = 16
  config.optimizer.schedule = 'cosine'
  config.optimizer.warmup_epochs = 3.0
  config.optimizer.weight_decay = 1e-4
  config.grad_clip_norm = 10.0

  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_epochs = 150
  config.log_every_steps = 24
  config.eval_every_steps = 240  # every 20 epochs, and at the end
  config.checkpoint_every_steps = 240
  return config
