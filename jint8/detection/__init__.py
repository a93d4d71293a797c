"""Object detection with int8 training: FCOS on BCCD (PASCAL VOC layout), scored with COCO mAP.

``voc`` builds the dataset, ``data`` and ``transforms`` feed it, ``fcos`` is the model, ``targets`` and
``losses`` train it, ``postprocess`` and ``coco_eval`` evaluate it, ``visualize`` draws detections and
``trainer`` runs it all (``config.task == "detection"`` in ``train.py``).
"""
