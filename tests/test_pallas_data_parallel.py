"""The Pallas backend under a 4-device data-parallel mesh (CPU devices, interpret mode) equals one device.

Runs in a subprocess started with 4 host devices (the test process has one). Integer results must be identical;
statistics combined from per-shard partials (deviation, DSGC scores) equal within float rounding.
"""

import os
import subprocess
import sys
import textwrap
import pathlib

REPO = pathlib.Path(__file__).parents[1]

_CHECK = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jint8 import backend, quant, sharding
    from jint8.pallas import PallasBackend, data_parallel

    assert jax.device_count() == 4
    mesh = Mesh(np.asarray(jax.devices()), (sharding.DATA_AXIS,))
    be = PallasBackend(interpret=True)
    rng = np.random.default_rng(int(SEED))
    ints = lambda *s: jnp.asarray(rng.integers(-127, 128, size=s), jnp.int8)
    x, w = ints(8, 7, 6, 12), ints(3, 3, 12, 10)
    geom = backend.ConvGeometry((2, 1), ((1, 1), (0, 2)), (1, 2), 1)
    g = ints(8, *geom.out_spatial((7, 6), (3, 3)), 10)
    gf = jnp.asarray(rng.standard_t(3, size=(8, 5, 4, 6)), jnp.float32)
    a, b, c = ints(8, 24), ints(24, 16), ints(8, 5)
    seeds = jnp.asarray([3, 4], jnp.uint32)
    ratios = quant.candidate_ratios(32, 2.0 ** -8)

    def ops(x, w, g, gf, a, b, c):
      assert data_parallel.shards(x.shape[0]) == shards
      clip = be.search_clip(gf, ratios=ratios, refine=8)
      gq = quant.quantize(gf, clip, seeds=seeds)  # jnp: GSPMD partitions it, with each element's global index
      return dict(fwd=be.conv(x, w, geom, 0.5, jnp.bfloat16), dgrad=be.conv_dgrad(g, w, geom, (7, 6), 0.25),
                  wgrad=be.conv_wgrad(x, g, geom, (3, 3), 2.0), rtn=quant.quantize(gf, jnp.float32(1.5)),
                  gq=gq, clip=clip, dev=quant.deviation_sums(gf, gq, clip).deviation(),
                  mm_fwd=be.matmul(a, b, (1, 0), 1.0), mm_dgrad=be.matmul(a, b.T, (1, 1), 1.0),
                  mm_wgrad=be.matmul(a, c, (0, 0), 1.0))

    args = (x, w, g, gf, a, b, c)
    shards = 1
    single = jax.jit(ops)(*args)
    batch, replicated = NamedSharding(mesh, P(sharding.DATA_AXIS)), NamedSharding(mesh, P())
    placed = [jax.device_put(v, replicated if v is w or v is b else batch) for v in args]
    shards = 4
    with jax.set_mesh(mesh):
      compiled = jax.jit(ops).lower(*placed).compile()
    sharded = compiled(*placed)
    assert 'all-gather' not in compiled.as_text(), 'operands were gathered'
    for k in single:
      if k in ('dev', 'clip'):  # float32 sums in another order: 1 - cos within a few float32 steps of cos
        np.testing.assert_allclose(sharded[k], single[k], rtol=1e-5, atol=2e-6, err_msg=k)
      else:
        np.testing.assert_array_equal(sharded[k], single[k], err_msg=k)
    print('OK', float(single['clip']), float(single['dev']))
    ''')


def test_pallas_ops_on_a_data_parallel_mesh_match_one_device(rng):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', PYTHONPATH=str(REPO),
             JAX_PLATFORMS='cpu')
  script = _CHECK.replace('SEED', str(int(rng.integers(1 << 30))))
  result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'OK' in result.stdout
