"""Pallas GEMM and conv kernels (interpret mode) against XlaBackend: exact integer results on odd shapes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jint8 import backend
from jint8.pallas import PallasBackend
from jint8.pallas import conv
from jint8.pallas import conv_wgrad
from jint8.pallas import gemm
from jint8.pallas import geometry

pytestmark = pytest.mark.usefixtures('fast_compiles')

XLA = backend.XlaBackend()


def _ints(key, shape):
  return jax.random.randint(jax.random.key(key), shape, -127, 128, jnp.int8)


@pytest.mark.parametrize('contract', [(1, 1), (1, 0), (0, 1), (0, 0)])
def test_matmul_matches_xla_exactly(contract):
  m, k, n = 37, 100, 45  # no dimension a multiple of its block
  a = _ints(1, (m, k) if contract[0] == 1 else (k, m))
  b = _ints(2, (n, k) if contract[1] == 1 else (k, n))
  out = PallasBackend().matmul(a, b, contract, 1.0)
  np.testing.assert_array_equal(out, XLA.matmul(a, b, contract, 1.0))


def test_gemm_tiles_split_reduction_and_scale():
  a, b = _ints(3, (40, 150)), _ints(4, (33, 150))
  cfg = gemm.GemmConfig(16, 16, 32, 4, 2)  # 3 x 3 tiles, a tail in every dimension
  exact = a.astype(jnp.int32) @ b.T.astype(jnp.int32)
  np.testing.assert_array_equal(gemm.matmul_kmajor(a, b, 1.0, interpret=True, config=cfg), exact)
  # reductions longer than max_terms are split into exact int32 chunks added in float32
  split = gemm.matmul_kmajor(a, b, 0.25, interpret=True, config=cfg, max_terms=64)
  np.testing.assert_array_equal(split, np.asarray(exact, np.float32) * 0.25)


def test_gemm_rejects_bad_operands():
  with pytest.raises(TypeError, match='int8'):
    gemm.matmul_kmajor(jnp.ones((4, 32)), jnp.ones((4, 32)), 1.0, interpret=True)
  with pytest.raises(ValueError, match=r'\[M, K\]'):
    gemm.matmul_kmajor(jnp.ones((4, 32), jnp.int8), jnp.ones((4, 33), jnp.int8), 1.0, interpret=True)


# (N, spatial, Cin, kernel, Cout, groups, strides, padding, dilation, wgrad layout)
CASES = {
    '3x3 pad1 cin5': (2, (7, 6), 5, (3, 3), 6, 1, (1, 1), ((1, 1), (1, 1)), (1, 1), 'register'),
    'stride2x1 asym-pad dil1x2 groups2': (2, (9, 8), 4, (3, 2), 6, 2, (2, 1), ((1, 0), (0, 2)), (1, 2), 'kmajor'),
    'stride3x2 dil2 (uneven phases)': (1, (11, 7), 3, (3, 3), 4, 1, (3, 2), ((2, 1), (1, 1)), (2, 1), 'swapped'),
    'stride2 dil2 (empty phases)': (1, (9, 9), 3, (3, 3), 5, 1, (2, 2), ((1, 1), (1, 1)), (2, 2), 'mixed'),
    '1x1 stride2 aligned cin32': (2, (6, 5), 32, (1, 1), 20, 1, (2, 2), ((0, 0), (0, 0)), (1, 1), 'mnmajor'),
    '3x3 aligned groups2': (1, (5, 6), 64, (3, 3), 24, 2, (1, 1), ((1, 1), (1, 1)), (1, 1), 'register'),
    'depthwise 3x3 stride2': (2, (7, 8), 20, (3, 3), 20, 20, (2, 2), ((1, 1), (1, 1)), (1, 1), None),
    'depthwise 5x5 dil2 stride1x2': (1, (9, 7), 18, (5, 5), 18, 18, (1, 2), ((4, 3), (2, 2)), (2, 1), None),
    'depthwise multiplier 2': (1, (6, 7), 6, (3, 3), 12, 6, (1, 1), ((1, 1), (0, 0)), (1, 1), 'register'),
    '1-D stride2 dil2': (2, (13,), 5, (3,), 7, 1, (2,), ((2, 1),), (2,), 'register'),
}


@pytest.mark.parametrize('case', list(CASES))
def test_convs_match_xla_exactly(case):
  n, spatial, cin, kernel, cout, groups, strides, padding, dilation, layout = CASES[case]
  geom = backend.ConvGeometry(strides, padding, dilation, groups)
  x = _ints(5, (n, *spatial, cin))
  w = _ints(6, (*kernel, cin // groups, cout))
  g = _ints(7, (n, *geom.out_spatial(spatial, kernel), cout))
  be = PallasBackend(conv_impl='pallas', dgrad_impl='pallas', wgrad_layout=layout)
  expected = 'depthwise' if layout is None else 'gemm'
  assert be.plan('conv', x.shape, w.shape, geom) == expected
  assert be.plan('wgrad', x.shape, w.shape, geom) == (expected if layout is None else f'gemm-{layout}')
  np.testing.assert_array_equal(be.conv(x, w, geom, 1.0), XLA.conv(x, w, geom, 1.0))
  np.testing.assert_array_equal(be.conv_dgrad(g, w, geom, spatial, 1.0), XLA.conv_dgrad(g, w, geom, spatial, 1.0))
  np.testing.assert_array_equal(be.conv_wgrad(x, g, geom, kernel, 1.0), XLA.conv_wgrad(x, g, geom, kernel, 1.0))
  assert not be.fallbacks


def test_conv_scale_config_and_split_wgrad():
  geom = backend.ConvGeometry((1, 1), ((1, 1), (1, 1)), (1, 1), 1)
  x, w = _ints(8, (2, 5, 7, 32)), _ints(9, (3, 3, 32, 20))
  g = _ints(10, (2, 5, 7, 20))
  cfg = conv.ConvConfig(16, 16, 32, 4, 2)  # several row and column tiles, aligned K steps
  np.testing.assert_allclose(conv.conv_forward(x, w, geom, 0.37, interpret=True, config=cfg),
                             XLA.conv(x, w, geom, 0.37), rtol=1e-6)
  wcfg = dataclasses.replace(conv_wgrad.pick_config(32, 20), block_k=32)
  dw = conv_wgrad.conv_wgrad(x, g, geom, (3, 3), 0.5, interpret=True, config=wcfg, max_terms=40)
  np.testing.assert_array_equal(dw, XLA.conv_wgrad(x, g, geom, (3, 3), 0.5))  # 3 partial sums of <= 32 pixels


@pytest.mark.parametrize('case', ['3x3 aligned groups2', 'stride2x1 asym-pad dil1x2 groups2', 'depthwise 3x3 stride2'])
def test_bfloat16_epilogue_rounds_the_float32_result_once(case):
  n, spatial, cin, kernel, cout, groups, strides, padding, dilation, _ = CASES[case]
  geom = backend.ConvGeometry(strides, padding, dilation, groups)
  x, w = _ints(14, (n, *spatial, cin)), _ints(15, (*kernel, cin // groups, cout))
  g = _ints(16, (n, *geom.out_spatial(spatial, kernel), cout))
  be = PallasBackend(conv_impl='pallas', dgrad_impl='pallas')
  y = be.conv(x, w, geom, 0.37, out_dtype=jnp.bfloat16)
  dx = be.conv_dgrad(g, w, geom, spatial, 0.011, out_dtype=jnp.bfloat16)
  assert y.dtype == dx.dtype == jnp.bfloat16
  expected_y = XLA.conv(x, w, geom, 0.37)
  expected_dx = XLA.conv_dgrad(g, w, geom, spatial, 0.011)
  np.testing.assert_array_equal(y, expected_y.astype(jnp.bfloat16))
  np.testing.assert_array_equal(dx, expected_dx.astype(jnp.bfloat16))
  np.testing.assert_array_equal(XLA.conv(x, w, geom, 0.37, jnp.bfloat16), y)


def test_vendor_paths_match_xla():
  geom = backend.ConvGeometry((1, 1), ((1, 0), (2, 1)), (1, 2), 1)
  x, w = _ints(11, (2, 6, 7, 8)), _ints(12, (3, 2, 8, 4))
  g = _ints(13, (2, *geom.out_spatial((6, 7), (3, 2)), 4))
  be = PallasBackend(conv_impl='vendor', dgrad_impl='vendor')
  assert be.plan('conv', x.shape, w.shape, geom) == be.plan('dgrad', x.shape, w.shape, geom) == 'vendor'
  np.testing.assert_array_equal(be.conv(x, w, geom, 1.0), XLA.conv(x, w, geom, 1.0))
  np.testing.assert_array_equal(be.conv_dgrad(g, w, geom, (6, 7), 1.0), XLA.conv_dgrad(g, w, geom, (6, 7), 1.0))
  strided = backend.ConvGeometry((2, 2), ((1, 1), (1, 1)), (1, 1), 1)
  assert be.plan('dgrad', x.shape, w.shape, strided) == 'gemm'  # the vendor conv takes no stride here
  assert PallasBackend().plan('conv', x.shape, w.shape, geom) == 'gemm'  # "auto" runs the kernels


def test_3d_convs_fall_back_explicitly():
  geom = backend.ConvGeometry((1, 2, 1), ((1, 1), (0, 0), (1, 0)), (1, 1, 1), 1)
  x, w = _ints(14, (1, 4, 5, 3, 4)), _ints(15, (2, 2, 2, 4, 3))
  g = _ints(16, (1, *geom.out_spatial((4, 5, 3), (2, 2, 2)), 3))
  be = PallasBackend(conv_impl='pallas')
  np.testing.assert_array_equal(be.conv(x, w, geom, 1.0), XLA.conv(x, w, geom, 1.0))
  np.testing.assert_array_equal(be.conv_wgrad(x, g, geom, (2, 2, 2), 1.0),
                                XLA.conv_wgrad(x, g, geom, (2, 2, 2), 1.0))
  assert len(be.fallbacks) == 2 and all('3-D' in reason for reason in be.fallbacks.values())


def test_bad_options_and_operands():
  with pytest.raises(ValueError, match='conv_impl'):
    PallasBackend(conv_impl='cudnn')
  with pytest.raises(ValueError, match='wgrad_layout'):
    PallasBackend(wgrad_layout='transposed')
  geom = backend.ConvGeometry((1, 1), ((0, 0), (0, 0)), (1, 1), 1)
  with pytest.raises(TypeError, match='int8'):
    conv.conv_forward(jnp.ones((1, 4, 4, 8)), jnp.ones((1, 1, 8, 8)), geom, 1.0, interpret=True)
  with pytest.raises(ValueError, match='unknown conv op'):
    PallasBackend().plan('transpose', (1, 4, 4, 8), (1, 1, 8, 8), geom)


def test_dgrad_phases_cover_every_input_row_once():
  for size, out, k, stride, pad, dil in ((9, 5, 3, 2, 1, 1), (11, 4, 3, 3, 2, 2), (9, 3, 3, 2, 1, 2)):
    axis = geometry.dgrad_axis(size, out, k, stride, pad, dil)
    rows = sorted(i * stride + p for p, (count, *_) in enumerate(axis.phases) for i in range(count))
    assert rows == list(range(size))
    for p, (_, b0, tap0, count) in enumerate(axis.phases):
      taps = [tap0 + j * axis.tap_step for j in range(count)]
      assert taps == [t for t in range(k) if (p + pad - t * dil) % stride == 0]


def test_kernels_lower_to_triton():
  """Every kernel lowers to Triton IR for CUDA (what a GPU compiles), checked without a GPU."""
  s = jax.ShapeDtypeStruct
  g1 = backend.ConvGeometry((1, 1), ((1, 1), (1, 1)), (1, 1), 1)
  g2 = backend.ConvGeometry((2, 2), ((1, 1), (1, 1)), (1, 1), 1)
  dw = backend.ConvGeometry((2, 2), ((1, 1), (1, 1)), (1, 1), 32)
  x64, w64, x3, w3 = s((2, 8, 8, 64), jnp.int8), s((3, 3, 64, 64), jnp.int8), s((2, 8, 8, 3), jnp.int8), s(
      (3, 3, 3, 16), jnp.int8)
  xd, wd, gd = s((2, 8, 8, 32), jnp.int8), s((3, 3, 1, 32), jnp.int8), s((2, 4, 4, 32), jnp.int8)
  be = PallasBackend(interpret=False)
  cases = [
      (lambda v: be.search_clip(v, ratios=np.ones(4), refine=0), (s((5000,), jnp.float32),)),
      (lambda a, b: be.matmul(a, b, (1, 0), 1.0), (s((100, 64), jnp.int8), s((64, 50), jnp.int8))),
      (lambda a, b: be.conv(a, b, g1, 1.0), (x64, w64)),
      (lambda a, b: be.conv(a, b, g2, 1.0), (x3, w3)),
      (lambda a, b: be.conv_dgrad(a, b, g2, (8, 8), 1.0), (s((2, 4, 4, 64), jnp.int8), w64)),
      (lambda a, b: be.conv(a, b, dw, 1.0), (xd, wd)),
      (lambda a, b: be.conv_dgrad(a, b, dw, (8, 8), 1.0), (gd, wd)),
      (lambda a, b: be.conv_wgrad(a, b, dw, (3, 3), 1.0), (xd, gd)),
  ] + [(lambda a, b, p=PallasBackend(interpret=False, wgrad_layout=layout): p.conv_wgrad(a, b, g1, (3, 3), 1.0),
        (x64, x64)) for layout in conv_wgrad.LAYOUTS]
  for fn, args in cases:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',)).as_text()
    assert 'triton' in text
