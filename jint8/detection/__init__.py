"""Object detection with int8 training: FCOS on PASCAL VOC or COCO-format data (BCCD by default), COCO mAP.

``dataset`` prepares the data that ``source`` (a folder or an archive) holds, read by ``voc`` or ``coco`` into
``annotations``, which checks it; ``data`` and ``transforms`` feed it, ``fcos`` is the model, ``targets`` and
``losses`` train it, ``postprocess`` and ``coco_eval`` evaluate it, ``visualize`` draws detections and
``trainer`` is the task on ``jint8.training`` (``config.task == "detection"`` in ``train.py``).
"""
