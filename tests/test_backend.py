"""The integer backends' interface and the exact XLA reference backend (``jint8.backend``)."""

import jax
import numpy as np
import pytest
from jax import lax

from jint8 import backend as backend_lib

XLA = backend_lib.get_backend('xla')

# (batch, spatial, cin, cout, kernel, strides, padding, dilation, groups)
CONV_CASES = [
    (2, (9, 9), 4, 6, (3, 3), (1, 1), 'SAME', (1, 1), 1),
    (2, (9, 8), 4, 6, (3, 3), (2, 2), 'SAME', (1, 1), 2),           # strided, grouped, odd sizes
    (3, (10, 7), 6, 6, (3, 3), (2, 1), ((1, 2), (0, 1)), (2, 1), 6),  # depthwise, explicit pads, dilated
    (2, (7, 7), 3, 5, (1, 1), (2, 2), 'VALID', (1, 1), 1),          # strided 1x1
    (2, (11,), 4, 8, (5,), (3,), 'SAME', (2,), 2),                   # 1-D
    (1, (8, 8), 8, 8, (3, 3), (1, 1), 'VALID', (3, 3), 8),           # depthwise, dilation 3
]
CASE_IDS = ['3x3', 'strided-grouped', 'depthwise-dilated', '1x1-strided', '1d', 'depthwise-valid']


def _dims(nd):
  return backend_lib.channels_last_dimension_numbers(nd)


def _pads(case):
  _, spatial, _, _, kernel, strides, padding, dilation, _ = case
  if isinstance(padding, str):
    return lax.padtype_to_pads(spatial, [(k - 1) * d + 1 for k, d in zip(kernel, dilation)], strides, padding)
  return padding


def _geometry(case):
  _, _, _, _, _, strides, _, dilation, groups = case
  return backend_lib.ConvGeometry(strides, tuple(map(tuple, _pads(case))), dilation, groups)


def _float_conv(case, precision=lax.Precision.HIGHEST):
  _, _, _, _, _, strides, _, dilation, groups = case
  return lambda x, w: lax.conv_general_dilated(
      x, w, strides, _pads(case), rhs_dilation=dilation, dimension_numbers=_dims(len(strides)),
      feature_group_count=groups, precision=precision)


def _int8(rng, shape):
  return rng.integers(-127, 128, shape).astype(np.int8)


@pytest.mark.parametrize('case', CONV_CASES, ids=CASE_IDS)
def test_xla_backend_conv_is_exact(rng, case):
  n, spatial, cin, cout, kernel, _, _, _, groups = case
  x, w = _int8(rng, (n, *spatial, cin)), _int8(rng, (*kernel, cin // groups, cout))
  y, vjp = jax.vjp(_float_conv(case), x.astype(np.float32), w.astype(np.float32))
  g = _int8(rng, y.shape)
  dx, dw = vjp(g.astype(np.float32))  # float32 sums of these few int products are exact
  geometry = _geometry(case)
  np.testing.assert_array_equal(np.asarray(XLA.conv(x, w, geometry, 1.0)), np.asarray(y))
  np.testing.assert_array_equal(np.asarray(XLA.conv_dgrad(g, w, geometry, spatial, 1.0)), np.asarray(dx))
  np.testing.assert_array_equal(np.asarray(XLA.conv_wgrad(x, g, geometry, kernel, 1.0)), np.asarray(dw))


def test_wgrad_splits_reductions_that_would_overflow_int32(rng):
  # 35 images of 64x64 outputs: 143,360 products of 127 * 127 per kernel tap, past int32's 2^31.
  x = np.full((35, 64, 64, 1), 127, np.int8) * rng.choice([-1, 1], size=(35, 64, 64, 1)).astype(np.int8)
  g = x.copy()
  geometry = backend_lib.ConvGeometry((1, 1), ((0, 0), (0, 0)), (1, 1), 1)
  dw = XLA.conv_wgrad(x, g, geometry, (1, 1), 1.0)
  expected = float(np.sum(x.astype(np.int64) * g.astype(np.int64)))
  assert expected > 2**31
  np.testing.assert_allclose(float(dw[0, 0, 0, 0]), expected, rtol=1e-6)


def test_matmul_is_exact_and_splits_long_reductions(rng):
  a, b = _int8(rng, (5, 37)), _int8(rng, (37, 3))
  np.testing.assert_array_equal(np.asarray(XLA.matmul(a, b, (1, 0), 1.0)),
                                a.astype(np.int64) @ b.astype(np.int64))
  np.testing.assert_array_equal(np.asarray(XLA.matmul(a.T.copy(), b, (0, 0), 1.0)),
                                a.astype(np.int64) @ b.astype(np.int64))
  long = np.full((1, backend_lib.MAX_EXACT_TERMS + 1000), 127, np.int8)
  out = XLA.matmul(long, long.T.copy(), (1, 0), 1.0)
  np.testing.assert_allclose(float(out[0, 0]), 127.0 * 127 * long.shape[1], rtol=1e-6)


def test_a_reduction_longer_than_int32_holds_is_rejected_by_name():
  terms = backend_lib.MAX_EXACT_TERMS + 1
  x, w = np.ones((1, 1, 1, terms), np.int8), np.ones((1, 1, terms, 1), np.int8)
  geometry = backend_lib.ConvGeometry((1, 1), ((0, 0), (0, 0)), (1, 1), 1)
  with pytest.raises(NotImplementedError, match=f'int8 conv forward reduces over {terms} int8 products'):
    XLA.conv(x, w, geometry, 1.0)
  with pytest.raises(NotImplementedError, match=f'int8 conv dgrad reduces over {terms} int8 products'):
    XLA.conv_dgrad(np.ones((1, 1, 1, terms), np.int8), w.reshape(1, 1, 1, terms), geometry, (1, 1), 1.0)
