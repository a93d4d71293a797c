"""The Pallas DSGC search kernels (interpret mode) against jint8.quant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jint8 import backend
from jint8 import quant
from jint8.pallas import PallasBackend
from jint8.pallas import clip_scores

pytestmark = pytest.mark.usefixtures('fast_compiles')


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


@pytest.mark.parametrize('refine', [0, 8])
def test_search_clip_matches_xla_backend(refine):
  x = _heavy_tailed(3000, key=11).astype(jnp.bfloat16)  # a gradient in the model's dtype
  got = jax.jit(lambda x: PallasBackend().search_clip(x, ratios=RATIOS, refine=refine))(x)
  want = backend.XlaBackend().search_clip(x, ratios=RATIOS, refine=refine)
  assert float(got) == pytest.approx(float(want), rel=1e-6)
  assert float(got) == pytest.approx(float(quant.dsgc_search(x, RATIOS, refine).clip), rel=1e-6)
