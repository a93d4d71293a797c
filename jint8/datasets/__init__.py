"""Local datasets as tensorflow-datasets builders (array_record files, read without TensorFlow).

``paths`` finds the archives; ``provenance`` fingerprints them, to tell which one prepared data came from;
``cifar10_jpeg`` builds CIFAR-10 from ``cifar10-jpg.tar.gz``.
"""
