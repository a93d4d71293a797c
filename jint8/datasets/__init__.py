"""Local datasets as tensorflow-datasets builders (array_record files, read without TensorFlow).

``paths`` finds the archives; ``cifar10_jpeg`` builds CIFAR-10 from ``cifar10-jpg.tar.gz``.
"""
