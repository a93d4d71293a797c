"""jint8.quant against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jint8 import quant


def heavy_tailed(rng, n):
  """A gradient-like sample, sharp and wide (NOTES §1): Student-t with 2 degrees of freedom."""
  return (rng.standard_t(2.0, size=n) * 1e-3).astype(np.float32)


def test_quantize_matches_numpy_per_tensor(rng):
  x = rng.normal(size=(7, 13)).astype(np.float32) * 3
  clip = np.float32(2.5)
  expected = np.round(np.clip(x / clip, -1, 1) * 127).astype(np.int8)
  q = quant.quantize(jnp.asarray(x), clip)
  assert q.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(q), expected)
  assert np.asarray(q).max() == 127 and np.asarray(q).min() == -127  # values beyond the clip saturate


def test_quantize_per_channel(rng):
  x = rng.normal(size=(5, 4, 6)).astype(np.float32)
  clip = np.abs(x).max(axis=(0, 2)).astype(np.float32)
  expected = np.round(np.clip(x / clip[None, :, None], -1, 1) * 127).astype(np.int8)
  np.testing.assert_array_equal(np.asarray(quant.quantize(jnp.asarray(x), clip, axis=1)), expected)
  np.testing.assert_allclose(np.asarray(quant.max_abs(jnp.asarray(x), axis=1)), clip)


def test_dequantize_round_trip_error_is_half_a_step(rng):
  x = rng.uniform(-1, 1, size=1000).astype(np.float32)
  clip = np.float32(1.0)
  x_hat = np.asarray(quant.dequantize(quant.quantize(jnp.asarray(x), clip), clip))
  assert np.abs(x_hat - x).max() <= clip / 127 / 2 + 1e-7


def test_stochastic_rounding_is_unbiased_and_deterministic(rng):
  x = rng.uniform(-1, 1, size=64).astype(np.float32)
  seeds = jnp.asarray(rng.integers(0, 2 ** 32, size=(4000, 2)), jnp.uint32)
  samples = jax.vmap(lambda s: quant.quantize(jnp.asarray(x), 1.0, seeds=s))(seeds)
  samples = np.asarray(samples).astype(np.float64)
  v = x.astype(np.float64) * 127
  assert np.all((samples == np.floor(v)) | (samples == np.ceil(v)))
  # The mean of 4000 Bernoulli draws is within 5 standard errors (<= 0.5 / sqrt(4000)) of v.
  assert np.abs(samples.mean(0) - v).max() < 5 * 0.5 / np.sqrt(4000)
  a = quant.quantize(jnp.asarray(x), 1.0, seeds=seeds[0])
  b = quant.quantize(jnp.asarray(x), 1.0, seeds=seeds[0])
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_stochastic_rounding_of_one_large_tensor_is_unbiased(rng):
  n = 200_000  # one draw per element: the hash's stream along the flat index, not across seeds
  x = rng.uniform(-1, 1, size=(40, 50, 100)).astype(np.float32)
  seeds = jnp.asarray(rng.integers(0, 2 ** 32, size=2), jnp.uint32)
  q = np.asarray(quant.quantize(jnp.asarray(x), 1.0, seeds=seeds), np.float64)
  delta = q - x.astype(np.float64) * 127
  assert np.all((delta > -1) & (delta < 1))
  assert abs(delta.mean()) < 5 * 0.5 / np.sqrt(n)
  # a constant value rounds up with probability frac(v)
  const = np.asarray(quant.quantize(jnp.full((n,), 0.3 / 127, jnp.float32), 1.0, seeds=seeds), np.float64)
  assert abs(const.mean() - 0.3) < 5 * np.sqrt(0.21 / n)
  other = quant.quantize(jnp.asarray(x), 1.0, seeds=seeds ^ jnp.uint32(1))
  assert np.mean(np.asarray(other) != q) > 0.1


def test_uniform_hash_is_uniform_and_decorrelated(rng):
  seeds = jnp.asarray(rng.integers(0, 2 ** 32, size=2), jnp.uint32)
  u = np.asarray(quant.uniform_hash((256, 256), seeds)).ravel()
  assert u.min() >= 0.0 and u.max() < 1.0
  counts = np.histogram(u, bins=32, range=(0, 1))[0]
  expected = u.size / 32
  assert np.sum((counts - expected) ** 2 / expected) < 70  # chi-square, 31 dof: p ~ 1e-4
  assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.02  # neighbours along the last axis
  assert abs(np.corrcoef(u[:-256], u[256:])[0, 1]) < 0.02  # and along the first


def test_flat_index_is_the_row_major_index():
  np.testing.assert_array_equal(np.asarray(quant.flat_index((3, 4, 5))), np.arange(60, dtype=np.uint32).reshape(3, 4, 5))


def test_rounding_seeds_come_from_the_key_data(rng):
  key = jax.random.key(int(rng.integers(2 ** 31)), impl='rbg')
  words = np.asarray(jax.random.key_data(key))
  np.testing.assert_array_equal(np.asarray(quant.rounding_seeds(key)), words[:2])
  other = jax.random.fold_in(key, 1)
  assert not np.array_equal(np.asarray(quant.rounding_seeds(other)), words[:2])
  threefry = jax.random.key(int(rng.integers(2 ** 31)))
  np.testing.assert_array_equal(np.asarray(quant.rounding_seeds(threefry)), np.asarray(jax.random.key_data(threefry)))


def test_layer_seeds_give_unrelated_streams(rng):
  seeds = jnp.asarray(rng.integers(0, 2 ** 32, size=2), jnp.uint32)
  layers = np.asarray([quant.layer_seeds(seeds, i) for i in range(64)])
  assert layers.dtype == np.uint32 and len({tuple(s) for s in layers}) == 64
  assert not (layers == np.asarray(seeds)).all(axis=1).any()
  streams = [np.asarray(quant.uniform_hash((200, 300), jnp.asarray(s))).ravel() for s in layers[:4]]
  for a in range(4):
    for b in range(a + 1, 4):
      assert abs(np.corrcoef(streams[a], streams[b])[0, 1]) < 0.02
      assert abs(np.corrcoef(streams[a][:-1], streams[b][1:])[0, 1]) < 0.02  # nor shifted by an element
  # the same step seeds and index give the same seeds: every trace of a model rounds alike
  np.testing.assert_array_equal(np.asarray(quant.layer_seeds(seeds, 5)), layers[5])


@pytest.mark.parametrize('scale', [1e-30, 1e-3, 1e30])
def test_deviation_sums_give_the_float64_cosine_deviation(rng, scale):
  g = heavy_tailed(rng, 5000) * np.float32(scale / 1e-3)
  clip = np.float32(np.quantile(np.abs(g), 0.99))
  seeds = jnp.asarray(rng.integers(0, 2 ** 32, size=2), jnp.uint32)
  q = quant.quantize(jnp.asarray(g), clip, seeds=seeds)
  sums = quant.deviation_sums(jnp.asarray(g), q, clip)
  g64, q64 = g.astype(np.float64), np.asarray(q, np.float64)
  expected = 1 - g64 @ q64 / np.linalg.norm(g64) / np.linalg.norm(q64)
  np.testing.assert_allclose(float(sums.deviation()), expected, rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(float(sums.qq), q64 @ q64, rtol=1e-6)  # integers: exact up to float32 summation
  assert bool(sums.finite())


def test_deviation_sums_flag_non_finite_and_keep_the_zero_conventions(rng):
  g = jnp.asarray(rng.normal(size=300), jnp.float32)
  for bad in (jnp.inf, -jnp.inf, jnp.nan):
    bad_g = g.at[17].set(bad)
    assert not bool(quant.deviation_sums(bad_g, quant.quantize(g, 1.0), 1.0).finite())
  zero = jnp.zeros(300, jnp.float32)
  sums = quant.deviation_sums(zero, quant.quantize(zero, 1.0), 1.0)
  assert float(sums.deviation()) == 0.0 and bool(sums.finite())
  assert float(quant.deviation_sums(g, jnp.zeros(300, jnp.int8), 1.0).deviation()) == 1.0


def test_cosine_deviation_matches_float64(rng):
  a = rng.normal(size=300)
  b = a + 0.3 * rng.normal(size=300)
  expected = 1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b)
  got = quant.cosine_deviation(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  np.testing.assert_allclose(float(got), expected, rtol=1e-4)


@pytest.mark.parametrize('scale', [1e-30, 1e-3, 1e30])
def test_cosine_deviation_is_scale_free(rng, scale):
  a = rng.normal(size=100).astype(np.float32)
  b = (a + 0.1 * rng.normal(size=100)).astype(np.float32)
  ref = quant.cosine_deviation(jnp.asarray(a), jnp.asarray(b))
  got = quant.cosine_deviation(jnp.asarray(a * scale), jnp.asarray(b * scale))
  assert np.isfinite(float(got))
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-4, atol=1e-7)


def test_cosine_deviation_zero_conventions(rng):
  z = jnp.zeros(10)
  x = jnp.asarray(rng.normal(size=10), jnp.float32)
  assert float(quant.cosine_deviation(z, z)) == 0.0
  assert float(quant.cosine_deviation(x, z)) == 1.0


def test_dsgc_beats_max_abs_on_heavy_tailed_gradients(rng):
  g = heavy_tailed(rng, 20000)
  amax = np.abs(g).max()
  search = quant.dsgc_search(jnp.asarray(g))
  d_maxabs = float(quant.score_clips(jnp.asarray(g), jnp.asarray([amax]))[0])
  # Measured: DSGC removes 4-10% of max-abs clipping's deviation on such samples.
  assert float(search.deviation) < 0.98 * d_maxabs
  assert 0 < float(search.clip) < amax


def test_dsgc_matches_brute_force(rng):
  g = heavy_tailed(rng, 5000)
  amax = np.abs(g).max()
  clips = np.linspace(amax / 2000, amax, 2000)
  g64 = g.astype(np.float64)
  q = np.round(np.clip(g64[None] / clips[:, None], -1, 1) * 127)
  d = 1 - (q @ g64) / np.linalg.norm(g64) / np.linalg.norm(q, axis=1)
  search = quant.dsgc_search(jnp.asarray(g))
  # The grid search (32 candidates + 8 refinements) lands within 5% of the brute-force optimum deviation.
  assert float(search.deviation) <= d.min() * 1.05 + 1e-7
  # And its reported deviation is the true deviation at its clip.
  qs = np.round(np.clip(g64 / float(search.clip), -1, 1) * 127)
  d_at_clip = 1 - qs @ g64 / np.linalg.norm(g64) / np.linalg.norm(qs)
  np.testing.assert_allclose(float(search.deviation), d_at_clip, rtol=1e-3, atol=1e-7)


def test_score_clips_matches_numpy(rng):
  g = heavy_tailed(rng, 3000)
  clips = np.abs(g).max() * np.array([1.0, 0.5, 0.1, 0.01], np.float32)
  g64 = g.astype(np.float64)
  q = np.round(np.clip(g64[None] / clips[:, None].astype(np.float64), -1, 1) * 127)
  d = 1 - (q @ g64) / np.linalg.norm(g64) / np.linalg.norm(q, axis=1)
  np.testing.assert_allclose(np.asarray(quant.score_clips(jnp.asarray(g), jnp.asarray(clips))), d,
                             rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize('kind', ['zeros', 'constant', 'tiny', 'huge'])
def test_dsgc_edge_cases_never_nan_or_zero_clip(rng, kind):
  g = {
      'zeros': np.zeros(100, np.float32),
      'constant': np.full(100, -0.37, np.float32),
      'tiny': (rng.normal(size=100) * 1e-38).astype(np.float32),
      'huge': (rng.normal(size=100) * 1e37).astype(np.float32),
  }[kind]
  search = quant.dsgc_search(jnp.asarray(g))
  assert float(search.clip) > 0 and np.isfinite(float(search.clip))
  assert np.isfinite(float(search.deviation))
  q = quant.quantize(jnp.asarray(g), search.clip)
  assert np.isfinite(np.asarray(quant.dequantize(q, search.clip))).all()
  if kind in ('zeros', 'constant'):
    assert float(search.deviation) == 0.0
  if kind == 'constant':
    np.testing.assert_array_equal(np.asarray(q), -127)


def test_safe_clip_and_all_finite():
  clips = quant.safe_clip(jnp.asarray([0.0, -1.0, jnp.nan, jnp.inf, 2.0]))
  assert np.all(np.asarray(clips) > 0)
  assert float(clips[-1]) == 2.0
  assert bool(quant.all_finite(jnp.ones(3)))
  assert not bool(quant.all_finite(jnp.asarray([1.0, jnp.inf])))
  assert not bool(quant.all_finite(jnp.asarray([1.0, jnp.nan])))


def test_bad_input_errors():
  with pytest.raises(TypeError, match='floating-point'):
    quant.quantize(jnp.ones(3, jnp.int32), 1.0)
  with pytest.raises(ValueError, match='per-channel'):
    quant.quantize(jnp.ones((2, 3)), jnp.ones((2, 3)), axis=1)
  with pytest.raises(ValueError, match='scalar'):
    quant.quantize(jnp.ones((2, 3)), jnp.ones(3))
  with pytest.raises(ValueError, match='min_ratio'):
    quant.candidate_ratios(8, 1.5)
