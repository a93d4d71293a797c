"""Object detection with int8 training: FCOS on BCCD (PASCAL VOC layout), scored with COCO mAP.

``voc`` builds the dataset, ``data`` and ``transforms`` feed it, ``fcos`` is the model, ``targets`` and
``losses`` train it, ``postprocess`` and ``coco_eval`` evaluate it, ``visualize`` draws detections and
``trainer`` is the task on ``jint8.training`` (``config.task == "detection"`` in ``train.py``).
"""
