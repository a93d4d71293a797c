"""Pallas quantizer kernels (interpret mode) against jint8.quant: exact round to nearest, unbiased stochastic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jint8 import backend
from jint8 import quant
from jint8.pallas import PallasBackend
from jint8.pallas import clip_scores
from jint8.pallas import common
from jint8.pallas import quantize

pytestmark = pytest.mark.usefixtures('fast_compiles')


@pytest.mark.parametrize('shape,dtype,block', [((1000,), jnp.float32, 128), ((3, 37, 5), jnp.bfloat16, None),
                                               ((4099,), jnp.float16, 512)])
def test_round_to_nearest_matches_quant_exactly(shape, dtype, block):
  x = (jax.random.normal(jax.random.key(1), shape) * 2.0).astype(dtype)
  for clip in (1.7, 0.05, 0.0):  # 0.0: the safe tiny clip, everything saturates
    q = quantize.quantize(x, jnp.float32(clip), interpret=True, block=block)
    assert q.dtype == jnp.int8 and q.shape == shape
    np.testing.assert_array_equal(q, quant.quantize(x, jnp.float32(clip)))


def test_stats_match_reference():
  x = jax.random.t(jax.random.key(2), 3.0, (5000,)) * 1e-4
  q, stats = quantize.quantize(x, jnp.float32(2e-4), with_stats=True, interpret=True, block=256)
  ref_q, ref = quantize.reference_quantize(x, jnp.float32(2e-4), with_stats=True)
  np.testing.assert_array_equal(q, ref_q)
  assert float(stats.max_abs) == float(ref.max_abs)
  assert bool(stats.finite)
  np.testing.assert_allclose(stats.deviation, ref.deviation, rtol=1e-4, atol=1e-7)


def test_stats_detect_non_finite():
  x = jax.random.normal(jax.random.key(3), (700,))
  run = jax.jit(lambda x: quantize.quantize(x, jnp.float32(1.0), with_stats=True, interpret=True, block=128)[1])
  assert bool(run(x).finite)
  for bad in (jnp.inf, -jnp.inf, jnp.nan):
    assert not bool(run(x.at[321].set(bad)).finite)


def test_stochastic_rounding_is_unbiased_and_seeded():
  n = 20000
  x = jax.random.uniform(jax.random.key(4), (n,), minval=-1.0, maxval=1.0)
  seeds = jnp.array([123, 456], jnp.uint32)
  q = quantize.quantize(x, jnp.float32(1.0), seeds, interpret=True, block=4096)
  v = np.asarray(x) * quant.QMAX
  delta = np.asarray(q, np.float64) - v
  assert np.all((delta > -1.0) & (delta < 1.0))  # only floor(v) or floor(v) + 1
  assert abs(delta.mean()) < 5 * 0.5 / np.sqrt(n)
  # a constant value rounds up with probability frac(v)
  const = quantize.quantize(jnp.full((n,), 0.3 / quant.QMAX), jnp.float32(1.0), seeds, interpret=True)
  assert abs(float(jnp.mean(const.astype(jnp.float32))) - 0.3) < 5 * np.sqrt(0.21 / n)
  again = quantize.quantize(x, jnp.float32(1.0), seeds, interpret=True, block=4096)
  other = quantize.quantize(x, jnp.float32(1.0), jnp.array([124, 456], jnp.uint32), interpret=True, block=4096)
  np.testing.assert_array_equal(q, again)
  assert int(jnp.sum(q != other)) > n // 10


def test_uniform_hash_is_uniform_and_decorrelated():
  u = np.asarray(common.uniform(jnp.arange(1 << 16, dtype=jnp.int32), jnp.uint32(7), jnp.uint32(11)))
  assert u.min() >= 0.0 and u.max() < 1.0
  counts = np.histogram(u, bins=32, range=(0, 1))[0]
  expected = u.size / 32
  assert np.sum((counts - expected) ** 2 / expected) < 70  # chi-square, 31 dof: p ~ 1e-4
  assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.02


def test_rejects_integer_input():
  with pytest.raises(TypeError, match='floating-point'):
    quantize.quantize(jnp.ones((4,), jnp.int8), jnp.float32(1.0), interpret=True)


def _heavy_tailed(n, key=5):
  return jax.random.t(jax.random.key(key), 2.0, (n,)) * 1e-3


def test_abs_max_and_clip_scores_match_quant():
  g = _heavy_tailed(3001)
  abs_max = jax.jit(lambda g: clip_scores.abs_max(g, interpret=True, sub=256))
  amax, finite = abs_max(g)
  assert float(amax) == float(quant.max_abs(g)) and bool(finite)
  assert not bool(abs_max(g.at[7].set(jnp.nan))[1])
  clips = quant.safe_clip(amax) * quant.candidate_ratios(12)
  scores = clip_scores.clip_scores(g, amax, clips, interpret=True, sub=128)
  np.testing.assert_allclose(scores, quant.score_clips(g, clips), rtol=1e-4, atol=1e-6)


RATIOS = quant.candidate_ratios()


@pytest.mark.parametrize('clip', [3e-4, None])  # a given clip, max|g|
def test_quantize_gradient_matches_xla_backend(clip):
  g = _heavy_tailed(2500)
  args = (g, None if clip is None else jnp.float32(clip), jax.random.key(0))
  gq, used, deviation, finite = jax.jit(
      lambda g, key: PallasBackend().quantize_gradient(g, args[1], key, stochastic=False))(g, args[2])
  ref = backend.XlaBackend().quantize_gradient(*args, stochastic=False)
  assert float(used) == float(ref[1]) == (float(quant.max_abs(g)) if clip is None else pytest.approx(clip))
  np.testing.assert_array_equal(gq, ref[0])
  np.testing.assert_allclose(deviation, ref[2], rtol=1e-4, atol=1e-7)
  assert bool(finite)


@pytest.mark.parametrize('refine', [0, 8])
@pytest.mark.parametrize('search,clip', [(1, 0.5), (0, 0.75), (0, 0.0)])  # search, stored clip, no clip yet
def test_search_clip_matches_xla_backend(search, clip, refine):
  x = _heavy_tailed(3000, key=11).astype(jnp.bfloat16)  # an activation in the model's dtype
  args = (x, jnp.float32(clip), jnp.float32(search))
  got = jax.jit(lambda *a: PallasBackend().search_clip(*a, ratios=RATIOS, refine=refine))(*args)
  want = backend.XlaBackend().search_clip(*args, ratios=RATIOS, refine=refine)
  assert float(got) == pytest.approx(float(want), rel=1e-6)
  if search == 0 and clip > 0:
    assert float(got) == clip  # stored, not searched
  else:
    assert float(got) == pytest.approx(float(quant.dsgc_search(x, RATIOS, refine).clip), rel=1e-6)


def test_quantize_gradient_stochastic_and_non_finite():
  g = _heavy_tailed(4000, key=6)
  run = jax.jit(lambda g: PallasBackend().quantize_gradient(g, jnp.float32(2e-3), jax.random.key(1),
                                                            stochastic=True))
  gq, clip, deviation, finite = run(g)
  v = np.clip(np.asarray(g) / 2e-3, -1, 1) * quant.QMAX
  assert np.all(np.abs(np.asarray(gq, np.float64) - v) <= 1.0)
  assert float(clip) == pytest.approx(2e-3)
  np.testing.assert_allclose(deviation, quant.cosine_deviation(g, gq), rtol=1e-4, atol=1e-7)
  assert bool(finite)
  assert not bool(run(g.at[11].set(jnp.inf))[3])
