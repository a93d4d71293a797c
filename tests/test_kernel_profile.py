"""bench/kernel_profile.py: kernel names to categories and the per-step breakdown of a perfetto trace."""

import importlib.util
import pathlib

import pytest

_SPEC = importlib.util.spec_from_file_location(
    'kernel_profile', pathlib.Path(__file__).parents[1] / 'bench' / 'kernel_profile.py')
kernel_profile = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(kernel_profile)


@pytest.mark.parametrize('name, expected', [
    ('jint8_conv_wgrad', 'int8 wgrad (Pallas)'),
    ('jint8_conv', 'int8 fwd / dgrad / GEMM (Pallas)'),
    ('jint8_quantize_3', 'quantization (Pallas)'),
    ('sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32', 'XLA conv / GEMM (cuDNN, cuBLAS)'),
    ('loop_transpose_fusion_2', 'layout copies (transpose, copy)'),
    ('input_reduce_fusion_7', 'reductions (BN statistics, sums)'),
    ('loop_convert_fusion', 'elementwise fusions (BN, ReLU, optimizer)'),
    ('ncclDevKernel_AllReduce_Sum_f32_RING_LL', 'collectives (NCCL)'),
    ('redzone_checker', kernel_profile.OTHER),
])
def test_kernel_names_fall_in_their_category(name, expected):
  assert kernel_profile.category(name) == expected


def test_breakdown_sums_device_kernels_per_step(rng):
  durations = rng.uniform(1, 100, size=6)
  names = ['jint8_conv', 'jint8_conv', 'jint8_quantize', 'fusion_1', 'transpose_3', 'jint8_conv_wgrad']
  events = [{'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/device:GPU:0'}},
            {'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/host:CPU'}},
            {'ph': 'X', 'pid': 2, 'name': 'jint8_conv', 'dur': 1e6}]  # a host event: not device time
  events += [{'ph': 'X', 'pid': 1, 'name': n, 'dur': d} for n, d in zip(names, durations)]
  kernels = kernel_profile.device_kernels(events)
  assert kernels == list(zip(names, durations))
  step_us = durations.sum() / 2 + 50.0  # two steps traced: per step half the kernel time, and 50 us idle
  rows = kernel_profile.breakdown(kernels, steps=2, step_us=step_us)
  assert rows['int8 fwd / dgrad / GEMM (Pallas)'] == pytest.approx(durations[:2].sum() / 2)
  assert rows['int8 wgrad (Pallas)'] == pytest.approx(durations[5] / 2)
  assert rows['quantization (Pallas)'] == pytest.approx(durations[2] / 2)
  assert rows['idle'] == pytest.approx(50.0)
  assert sum(rows.values()) == pytest.approx(step_us)
  table = kernel_profile.format_table({'int8': rows})
  assert f"| idle | 50 us ({100 * 50 / sum(rows.values()):.0f}%) |" in table
