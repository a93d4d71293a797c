"""int8 ops: gradients against float64 references, exactness on integer-valued inputs, state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jint8 import backend as backend_lib
from jint8 import ops, quant
from jint8.ops import Int8Config, QuantState

from test_backend import CASE_IDS, CONV_CASES, XLA, _dims, _float_conv, _int8


def _value_and_vjp(f, g_fn):
  """Runs ``f``'s forward and its vjp with the cotangent ``g_fn(y)`` in one jitted call."""

  @jax.jit
  def run(*args):
    y, vjp = jax.vjp(f, *args)
    return y, vjp(g_fn(y))

  return run


def _seeds(rng):
  return jnp.asarray(rng.integers(0, 2 ** 32, size=2), jnp.uint32)


SEEDS = [jnp.asarray([7 * i + 1, 7 * i + 2], jnp.uint32) for i in range(4)]


def _state(**kw):
  return QuantState.initial()._replace(**{k: jnp.asarray(v, jnp.float32) for k, v in kw.items()})


def _cosine(a, b):
  a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
  return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


@pytest.mark.parametrize('case', CONV_CASES, ids=CASE_IDS)
def test_int8_conv_matches_float64(rng, case):
  n, spatial, cin, cout, kernel, strides, padding, dilation, groups = case
  x = rng.normal(size=(n, *spatial, cin)).astype(np.float32)
  w = rng.normal(size=(*kernel, cin // groups, cout)).astype(np.float32)
  seeds = _seeds(rng)

  def int8_conv(x, w):
    return ops.int8_conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
                                         dimension_numbers=_dims(len(strides)), feature_group_count=groups,
                                         state=_state(), seeds=seeds)

  out_shape = jax.eval_shape(int8_conv, x, w).shape
  g = rng.normal(size=out_shape).astype(np.float32)
  y, (dx, dw) = _value_and_vjp(int8_conv, lambda y: g)(x, w)
  with jax.enable_x64(True):
    y64, (dx64, dw64) = _value_and_vjp(_float_conv(case), lambda y: g.astype(np.float64))(
        x.astype(np.float64), w.astype(np.float64))
  # Stated thresholds: round-to-nearest int8 forward; stochastic-rounded int8 gradients.
  assert _cosine(y, y64) > 0.9995
  assert _cosine(dx, dx64) > 0.995
  assert _cosine(dw, dw64) > 0.995
  assert y.dtype == dx.dtype == dw.dtype == jnp.float32


def test_int8_conv_is_exact_on_integer_valued_inputs(rng):
  # With max-abs 127, quantization is the identity, so the op computes the exact integer conv and gradients.
  case = CONV_CASES[1]
  n, spatial, cin, cout, kernel, strides, padding, dilation, groups = case
  x = _int8(rng, (n, *spatial, cin)).astype(np.float32)
  w = _int8(rng, (*kernel, cin // groups, cout)).astype(np.float32)
  x.flat[0], w.flat[0] = 127, -127
  config = Int8Config(dsgc=False, stochastic_rounding=False)

  def int8_conv(x, w):
    return ops.int8_conv_general_dilated(x, w, strides, padding, dimension_numbers=_dims(2),
                                         feature_group_count=groups, state=_state(),
                                         seeds=SEEDS[0], config=config)

  g = _int8(rng, jax.eval_shape(int8_conv, x, w).shape).astype(np.float32)
  g.flat[0] = 127
  y, grads = _value_and_vjp(int8_conv, lambda y: g)(x, w)
  y_ref, grads_ref = _value_and_vjp(_float_conv(case), lambda y: g)(x, w)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
  for got, ref in zip(grads, grads_ref):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_conv_keeps_int8_residuals(rng):
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.bfloat16)
  geometry = backend_lib.ConvGeometry((1, 1), ((1, 1), (1, 1)), (1, 1), 1)
  y, residuals = ops._conv_fwd(x, w, _state(), SEEDS[0], geometry, Int8Config())
  xq, wq = residuals[:2]
  assert y.dtype == jnp.bfloat16
  assert xq.dtype == wq.dtype == jnp.int8 and xq.shape == x.shape and wq.shape == w.shape
  # The activation residual takes half the bytes of the bf16 activation it replaces.
  assert xq.nbytes * 2 == x.nbytes


def test_nchw_dimension_numbers(rng):
  x = rng.normal(size=(2, 4, 9, 9)).astype(np.float32)   # NCHW
  w = rng.normal(size=(6, 4, 3, 3)).astype(np.float32)   # OIHW
  dn = ('NCHW', 'OIHW', 'NCHW')
  y = ops.int8_conv_general_dilated(x, w, (2, 2), 'SAME', dimension_numbers=dn, state=_state(),
                                    seeds=SEEDS[0])
  ref = lax.conv_general_dilated(x, w, (2, 2), 'SAME', dimension_numbers=dn, precision='highest')
  assert y.shape == ref.shape
  assert _cosine(y, ref) > 0.9995


def _conv_cotangent(x, w, g, config, state, seeds=SEEDS[1]):
  """The state cotangent and the weight gradient of one int8 conv of ``x`` and ``w`` with output gradient ``g``."""
  f = lambda s, w: ops.int8_conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=_dims(2), state=s,
                                                 seeds=seeds, config=config)
  return _value_and_vjp(f, lambda y: g)(state, w)[1]


@pytest.mark.parametrize('refine', [0, 8])
def test_state_cotangent_search_and_reuse(rng, refine):
  x = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
  w = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  g = (rng.standard_t(2.0, size=(4, 16, 16, 4)) * 1e-3).astype(np.float32)

  searched, _ = _conv_cotangent(x, w, g, Int8Config(refine=refine), _state())
  expected = quant.dsgc_search(jnp.asarray(g), refine=refine)
  # The config's refine reaches the gradient's search: the two settings choose different clips here.
  assert float(expected.clip) != float(quant.dsgc_search(jnp.asarray(g), refine=8 - refine).clip)
  np.testing.assert_allclose(float(searched.grad_clip), float(expected.clip), rtol=1e-6)
  assert float(searched.uses) == 1.0 and float(searched.nonfinite) == 0.0
  assert 0 < float(searched.grad_deviation) < 0.1
  # A search step clips activations at this step's max-abs: no saturation.
  amax = np.abs(x).max()
  assert float(searched.input_amax[0]) == amax and float(searched.input_clip) == 0.0  # update derives the clip
  assert float(searched.input_saturation) == 1.0 and not np.any(np.asarray(searched.input_amax[1:]))
  # Between searches the stored clip is used as it is, and the deviation is still measured.
  reused, _ = _conv_cotangent(x, w, g, Int8Config(refine=refine, searches=False),
                              _state(grad_clip=0.123, input_clip=amax, input_amax=np.full(16, amax)))
  np.testing.assert_allclose(float(reused.grad_clip), 0.123, rtol=1e-6)
  assert float(reused.grad_deviation) > 0


def test_the_op_quantizes_with_jint8_quant_bit_for_bit(rng):
  # What the fused quantizers write is jint8.quant's quantization at the same clip: the int8 wgrad of the
  # op's operands equals the reference backend's wgrad of quant.quantize's, exactly.
  x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  w = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)
  g = (rng.standard_t(3.0, size=(2, 8, 8, 6)) * 1e-2).astype(np.float32)
  history = np.abs(x).max() * rng.uniform(0.5, 0.9, size=16).astype(np.float32)  # a stale clip: saturates
  seeds = _seeds(rng)
  config = Int8Config(searches=False)
  cot, dw = _conv_cotangent(x, w, g, config, _state(grad_clip=0.02, input_clip=history.max(), input_amax=history),
                            seeds)
  cx, cg = quant.safe_clip(history.max()), jnp.float32(0.02)
  xq, gq = quant.quantize(jnp.asarray(x), cx), quant.quantize(jnp.asarray(g), cg, seeds=seeds)
  geometry = backend_lib.ConvGeometry((1, 1), ((1, 1), (1, 1)), (1, 1), 1)
  expected = XLA.conv_wgrad(xq, gq, geometry, (3, 3), jnp.stack([cx / 127, cg / 127]))
  np.testing.assert_array_equal(np.asarray(dw), np.asarray(expected))
  # The side outputs equal separate reductions: max|x| (exact), the deviation (float64 reference).
  assert float(cot.input_amax[0]) == np.abs(x).max()
  assert float(cot.input_saturation) == pytest.approx(np.abs(x).max() / float(cx), rel=1e-6) and cot.input_saturation > 1
  g64, q64 = g.astype(np.float64).ravel(), np.asarray(gq, np.float64).ravel()
  np.testing.assert_allclose(float(cot.grad_deviation), 1 - g64 @ q64 / np.linalg.norm(g64) / np.linalg.norm(q64),
                             rtol=1e-3, atol=1e-7)


def test_a_clip_searched_on_an_all_zero_gradient_is_no_clip(rng):
  x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
  w = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  zero = np.zeros((2, 6, 6, 4), np.float32)
  searched, dw = _conv_cotangent(x, w, zero, Int8Config(), _state())
  assert float(searched.grad_clip) == 0.0  # so the next step searches again
  assert float(searched.grad_deviation) == 0.0 and float(searched.nonfinite) == 0.0
  assert not np.any(np.asarray(dw))
  steady, _ = _conv_cotangent(x, w, zero, Int8Config(searches=False),
                              _state(grad_clip=0.5, input_clip=1.0, input_amax=np.ones(16)))
  assert float(steady.grad_clip) == 0.5  # a stored clip stays


@pytest.mark.parametrize('backend', ['xla', 'pallas'])
@pytest.mark.parametrize('layer', ['conv', 'depthwise', 'dense'])
def test_tiny_clips_dequantize_to_the_exact_product_not_zero(rng, backend, layer):
  # Integers in [64, 127] times 2^-40 (activations, gradients) and 2^-90 (weights) quantize exactly (max-abs 127),
  # so the op computes the integer products times 2^-130 (forward, dgrad) and 2^-80 (wgrad): float32 normals.
  # One factor c * cw / 127^2 = 2^-130 would be a subnormal, which XLA flushes to zero: every output 0.
  ints = lambda *shape: rng.integers(64, 128, shape).astype(np.float32)
  if layer == 'dense':
    x, w = ints(4, 16), ints(16, 8)
    dims = (((1,), (0,)), ((), ()))
    f = lambda x, w: ops.int8_dot_general(x, w, dims, state=_state(), seeds=None, config=config)
    reference = lambda x, w: lax.dot_general(x, w, dims)
  else:
    groups = 8 if layer == 'depthwise' else 1
    x, w = ints(2, 6, 6, 8), ints(3, 3, 8 // groups, 8)
    f = lambda x, w: ops.int8_conv_general_dilated(x, w, (1, 1), 'VALID', dimension_numbers=_dims(2),
                                                   feature_group_count=groups, state=_state(), seeds=None,
                                                   config=config)
    reference = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), 'VALID', dimension_numbers=_dims(2),
                                                      feature_group_count=groups)
  config = Int8Config(backend=backend, dsgc=False, stochastic_rounding=False)
  g = ints(*jax.eval_shape(f, x, w).shape)
  x[(0,) * x.ndim] = w[(0,) * w.ndim] = g[(0,) * g.ndim] = 127
  small, tiny = 2.0 ** -40, 2.0 ** -90

  @jax.jit
  def run(x, w, g):  # every clip a runtime value, as in training (XLA folds a product of constants into one)
    y, vjp = jax.vjp(f, x, w)
    return y, vjp(g)

  y, (dx, dw) = run(x * small, w * tiny, g * small)
  with jax.enable_x64(True):
    y64, (dx64, dw64) = _value_and_vjp(reference, lambda y: g.astype(np.float64))(x.astype(np.float64),
                                                                                  w.astype(np.float64))
  for got, exact, scale in ((y, y64, small * tiny), (dx, dx64, small * tiny), (dw, dw64, small * small)):
    expected = (np.asarray(exact) * scale).astype(np.float32)
    assert np.all(expected >= np.finfo(np.float32).tiny)  # normal float32 values
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_differentiating_without_rounding_seeds_is_an_error(rng):
  x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
  w = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  f = lambda x: ops.int8_conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=_dims(2), state=_state(),
                                              seeds=None)
  assert f(x).shape == (2, 6, 6, 4)  # a forward pass needs none
  with pytest.raises(ValueError, match='needs the seeds of its stochastic rounding'):
    jax.grad(lambda x: f(x).sum())(x)
  with pytest.raises(TypeError, match='two uint32'):
    ops.int8_conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=_dims(2), state=_state(),
                                  seeds=jnp.ones(3, jnp.int32))


def test_nonfinite_gradient_is_reported_not_quantized(rng):
  x = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
  w = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  state = _state(grad_clip=0.5, grad_deviation=0.01, input_clip=3.0, input_amax=np.full(16, 3.0))
  for config in (Int8Config(), Int8Config(searches=False)):
    f = lambda x, w, s: ops.int8_conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=_dims(2),
                                                      state=s, seeds=SEEDS[0], config=config)
    for bad in (np.inf, np.nan):
      g = rng.normal(size=jax.eval_shape(f, x, w, state).shape).astype(np.float32)
      g[0, 1, 2, 3] = bad
      _, (dx, dw, cot) = _value_and_vjp(f, lambda y: g)(x, w, state)
      assert np.isnan(np.asarray(dx)).all() and np.isnan(np.asarray(dw)).all()
      assert float(cot.nonfinite) == 1.0


@pytest.mark.parametrize('lhs_shape,dims', [((2, 3, 5, 7), (((3,), (0,)), ((), ()))),
                                            ((7, 4, 3), (((0, 2), (1, 0)), ((), ())))])
def test_int8_dot_general_matches_float64(rng, lhs_shape, dims):
  (lc, rc), _ = dims
  rhs_shape = [0] * (len(rc) + 1)
  for l, r in zip(lc, rc):
    rhs_shape[r] = lhs_shape[l]
  rhs_shape[[i for i in range(len(rhs_shape)) if i not in rc][0]] = 6
  x = rng.normal(size=lhs_shape).astype(np.float32)
  w = rng.normal(size=rhs_shape).astype(np.float32)
  f = lambda x, w: ops.int8_dot_general(x, w, dims, state=_state(), seeds=SEEDS[3])
  g = rng.normal(size=jax.eval_shape(f, x, w).shape).astype(np.float32)
  y, (dx, dw) = _value_and_vjp(f, lambda y: g)(x, w)
  with jax.enable_x64(True):
    y64, (dx64, dw64) = _value_and_vjp(lambda a, b: lax.dot_general(a, b, dims), lambda y: g.astype(np.float64))(
        x.astype(np.float64), w.astype(np.float64))
  assert y.shape == y64.shape and dx.shape == x.shape and dw.shape == w.shape
  assert _cosine(y, y64) > 0.9995
  assert _cosine(dx, dx64) > 0.995
  assert _cosine(dw, dw64) > 0.995


def test_bad_input_errors(rng):
  x = rng.normal(size=(2, 5, 5, 4)).astype(np.float32)
  w = rng.normal(size=(3, 3, 4, 4)).astype(np.float32)
  kw = dict(dimension_numbers=_dims(2), state=_state(), seeds=SEEDS[0])
  with pytest.raises(TypeError, match='lhs must be a floating-point'):
    ops.int8_conv_general_dilated(x.astype(np.int32), w, (1, 1), 'SAME', **kw)
  with pytest.raises(NotImplementedError, match='lhs_dilation'):
    ops.int8_conv_general_dilated(x, w, (1, 1), 'SAME', lhs_dilation=(2, 2), **kw)
  with pytest.raises(ValueError, match='feature_group_count=3'):
    ops.int8_conv_general_dilated(x, w, (1, 1), 'SAME', feature_group_count=3, **kw)
  with pytest.raises(ValueError, match='contracting dimensions'):
    ops.int8_dot_general(x, w, (((3,), (1,)), ((), ())), state=_state(), seeds=SEEDS[0])
  with pytest.raises(ValueError, match='input_clip'):
    Int8Config(input_clip='stored')
  with pytest.raises(ValueError, match='unknown int8 backend'):
    backend_lib.get_backend('cuda-magic')


def test_auto_backend_is_the_xla_reference_off_gpu():
  assert jax.default_backend() == 'cpu'
  assert backend_lib.get_backend('auto') is XLA
  assert Int8Config().backend == 'auto'


def test_delayed_input_clip_is_the_largest_of_the_history(rng):
  x = (rng.standard_t(2.0, size=(2, 6, 6, 3))).astype(np.float32)
  w = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  history = rng.uniform(0.5, 2.0, size=16).astype(np.float32)
  geometry = backend_lib.ConvGeometry((1, 1), ((1, 1), (1, 1)), (1, 1), 1)
  for config, clip in ((Int8Config(searches=False), history.max()),              # between searches: delayed
                       (Int8Config(), np.abs(x).max()),                          # search step: exact
                       (Int8Config(input_clip='maxabs', searches=False), np.abs(x).max())):  # always exact
    _, residuals = ops._conv_fwd(jnp.asarray(x), jnp.asarray(w), _state(input_clip=history.max(), input_amax=history),
                                 SEEDS[0], geometry, config)
    xq, _, cx = residuals[:3]
    assert float(cx) == clip
    np.testing.assert_array_equal(np.asarray(xq), np.asarray(quant.quantize(jnp.asarray(x), clip)))
  with pytest.raises(ValueError, match='history'):
    Int8Config(history=0)


def test_a_trace_without_searches_uses_the_stored_clips(rng):
  x = (rng.standard_t(2.0, size=(2, 6, 6, 3))).astype(np.float32)
  w = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  g = (rng.standard_t(2.0, size=(2, 6, 6, 4)) * 1e-3).astype(np.float32)
  state = _state(grad_clip=0.123, input_clip=0.75, input_amax=np.full(16, 0.75))
  amax = np.abs(x).max()
  steady, _ = _conv_cotangent(x, w, g, Int8Config(searches=False), state)
  assert float(steady.grad_clip) == pytest.approx(0.123)
  assert float(steady.input_saturation) == pytest.approx(amax / 0.75, rel=1e-6)  # clipped at the stored 0.75
  searched, _ = _conv_cotangent(x, w, g, Int8Config(), state)
  np.testing.assert_allclose(float(searched.grad_clip), float(quant.dsgc_search(jnp.asarray(g)).clip), rtol=1e-6)
  assert float(searched.input_saturation) == 1.0 and float(searched.input_amax[0]) == amax  # clipped at max|x|


def _depthwise_conv(config, case):
  _, _, _, _, _, strides, padding, dilation, groups = case
  return lambda x, w: ops.int8_conv_general_dilated(
      x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=_dims(len(strides)),
      feature_group_count=groups, state=_state(), seeds=SEEDS[0], config=config)


@pytest.mark.parametrize('backend', ['xla', 'pallas'])
def test_depthwise_channel_clips_are_exact_on_channels_of_different_scales(rng, backend):
  # Each weight channel is an integer tensor of max-abs 127 times its own power of two: a clip per channel
  # quantizes it exactly, so forward, dgrad and wgrad equal the float conv; one clip per tensor does not.
  case = CONV_CASES[2]  # depthwise, strided, dilated, explicit pads
  n, spatial, cin, cout, kernel, *_ = case
  x = _int8(rng, (n, *spatial, cin)).astype(np.float32)
  x.flat[0] = 127
  scales = 2.0 ** rng.integers(-8, 3, size=cout)
  w_int = _int8(rng, (*kernel, 1, cout)).astype(np.float32)
  w_int[0, 0, 0, :] = 127
  w = w_int * scales.astype(np.float32)
  config = Int8Config(backend=backend, dsgc=False, stochastic_rounding=False, depthwise_channel_clips=True)
  g = _int8(rng, jax.eval_shape(_depthwise_conv(config, case), x, w).shape).astype(np.float32)
  g.flat[0] = 127
  y, grads = _value_and_vjp(_depthwise_conv(config, case), lambda y: g)(x, w)
  y_ref, grads_ref = _value_and_vjp(_float_conv(case), lambda y: g)(x, w)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
  for got, ref in zip(grads, grads_ref):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  per_tensor = Int8Config(backend=backend, dsgc=False, stochastic_rounding=False)
  y_tensor = _value_and_vjp(_depthwise_conv(per_tensor, case), lambda y: g)(x, w)[0]
  assert not np.array_equal(np.asarray(y_tensor), np.asarray(y_ref))


def test_depthwise_channel_clips_cut_the_error_of_small_channels(rng):
  case = CONV_CASES[5]  # depthwise, dilation 3
  n, spatial, cin, cout, kernel, *_ = case
  x = rng.normal(size=(n, *spatial, cin)).astype(np.float32)
  w = (rng.normal(size=(*kernel, 1, cout)) * 10.0 ** rng.uniform(-3, 0, size=cout)).astype(np.float32)
  with jax.enable_x64(True):
    y64 = np.asarray(_float_conv(case)(x.astype(np.float64), w.astype(np.float64)))

  def channel_errors(config):
    y = np.asarray(_depthwise_conv(config, case)(x, w), np.float64)
    return np.linalg.norm((y - y64).reshape(-1, cout), axis=0) / np.linalg.norm(y64.reshape(-1, cout), axis=0)

  per_channel = channel_errors(Int8Config(depthwise_channel_clips=True))
  per_tensor = channel_errors(Int8Config())
  assert per_channel.max() < 0.02  # every channel keeps its int8 levels
  assert per_tensor.max() > 10 * per_channel.max()  # the channel of the smallest weights loses them


def test_depthwise_channel_clips_leave_other_convs_unchanged(rng):
  for case in (CONV_CASES[0], CONV_CASES[1]):  # dense and grouped (several input channels per group)
    n, spatial, cin, cout, kernel, *_, groups = case
    x = rng.normal(size=(n, *spatial, cin)).astype(np.float32)
    w = rng.normal(size=(*kernel, cin // groups, cout)).astype(np.float32)
    g = rng.normal(size=jax.eval_shape(_depthwise_conv(Int8Config(), case), x, w).shape).astype(np.float32)
    on = _value_and_vjp(_depthwise_conv(Int8Config(depthwise_channel_clips=True), case), lambda y: g)(x, w)
    off = _value_and_vjp(_depthwise_conv(Int8Config(), case), lambda y: g)(x, w)
    jax.tree.map(np.testing.assert_array_equal, on, off)
