"""Pallas GPU kernels for the int8 ops, one per module, registered here as the int8 backend ``"pallas"``
(``jint8.pallas.backend.PallasBackend``); ``jint8.backend.get_backend("pallas")`` imports this package."""

from jint8.backend import register_backend
from jint8.pallas.backend import PallasBackend

register_backend(PallasBackend())
