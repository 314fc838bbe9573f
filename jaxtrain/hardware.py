"""Device peaks for MFU and bandwidth for decoding, by exact device kind. Dense figures only.

Peaks are per device, TFLOP/s, dense (never the 2:4 sparsity figures that datasheets print
first: nanoGPT#464, fms-fsdp#89). The bf16 figures of A40, A100, H100 SXM / PCIe and H200 are
DESIGN.md's; the others come from NVIDIA's datasheets (H100 / H200 / L40S / A100 / A40 product
briefs), halved where only the sparse figure is printed. A device kind not in the table gets no
peak, hence no MFU (null with a note), never a neighbour's number.

float32 on a GPU: JAX's default matmul precision computes float32 dots with TF32 tensor cores on
Ampere and newer (docs.jax.dev, "Matmul precision"), so the float32 peak is the TF32 one unless
`jax_default_matmul_precision` asks for true float32 (`highest`, `float32`, `F32_F32_F32`); the
source string says which was counted.

On CPU there is no datasheet number that means anything for XLA, so the peak is measured: the
FLOP/s of a large jitted fp32 matmul on this machine, labelled as measured.
"""

import dataclasses
import functools
import re
import time

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Device:
  name: str
  bf16: float  # dense bf16 / fp16 tensor-core TFLOP/s
  tf32: float  # dense TF32 tensor-core TFLOP/s
  fp32: float  # non-tensor fp32 TFLOP/s
  bandwidth_gbs: float | None  # HBM / GDDR bandwidth
  memory_gib: float | None  # what the device shows (GDDR boards with ECC on lose 1/16: 45 of 48)


# (regex over the lower-cased `device_kind`, device). First match wins: specific names first.
DEVICES = (
    (r"gh200", Device("GH200", 989.4, 494.7, 66.9, 4000.0, 96.0)),
    (r"h200.*nvl", Device("H200 NVL", 835.5, 417.5, 60.0, 4800.0, 141.0)),
    (r"h200", Device("H200 SXM", 989.4, 494.7, 66.9, 4800.0, 141.0)),
    (r"h100.*pcie", Device("H100 PCIe", 756.0, 378.0, 51.2, 2000.0, 80.0)),
    (r"h100.*nvl", Device("H100 NVL", 835.5, 417.5, 60.0, 3900.0, 94.0)),
    (r"h100", Device("H100 SXM", 989.4, 494.7, 66.9, 3350.0, 80.0)),
    (r"a100.*(pcie.*40|40.*pcie)", Device("A100 40GB PCIe", 312.0, 156.0, 19.5, 1555.0, 40.0)),
    (r"a100.*(pcie.*80|80.*pcie)", Device("A100 80GB PCIe", 312.0, 156.0, 19.5, 1935.0, 80.0)),
    (r"a100.*40", Device("A100 40GB SXM", 312.0, 156.0, 19.5, 1555.0, 40.0)),
    (r"a100.*80", Device("A100 80GB SXM", 312.0, 156.0, 19.5, 2039.0, 80.0)),
    (r"l40s", Device("L40S", 362.05, 183.0, 91.6, 864.0, 45.0)),
    (r"\ba40\b", Device("A40", 149.7, 74.8, 37.4, 696.0, 45.0)),
)

_TRUE_FP32 = ("highest", "float32", "f32_f32_f32")


def device_info(device_kind: str):
  """The table row for a device kind string, or None if it is not in the table."""
  kind = device_kind.lower()
  for pattern, device in DEVICES:
    if re.search(pattern, kind):
      return device
  return None


@functools.lru_cache(maxsize=None)
def measured_matmul_tflops(n: int = 2048, repeats: int = 5) -> float:
  """Median TFLOP/s of a jitted fp32 n x n matmul on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  times.sort()
  return 2 * n ** 3 / times[len(times) // 2] / 1e12


def table_peak_tflops(device_kind: str, dtype: str):
  """(dense peak TFLOP/s, source) from the table, or (None, why) for an unknown device."""
  device = device_info(device_kind)
  if device is None:
    return None, f"unknown device {device_kind!r}: no peak in jaxtrain/hardware.py, so no MFU"
  if dtype in ("bfloat16", "float16"):
    return device.bf16, f"{device.name} dense {dtype} (table)"
  precision = str(jax.config.jax_default_matmul_precision or "default").lower()
  if precision in _TRUE_FP32:
    return device.fp32, f"{device.name} fp32 without tensor cores (matmul precision {precision})"
  return device.tf32, f"{device.name} dense TF32, as JAX's default precision runs float32 dots"


def device_peak_tflops(dtype: str, device=None):
  """(peak TFLOP/s per device, source) for the compute dtype: the table, or measured on CPU."""
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    return measured_matmul_tflops(), "measured fp32 matmul"
  return table_peak_tflops(device.device_kind, dtype)


def device_bandwidth_gbs(device=None):
  """Memory bandwidth in GB/s for decoding efficiency, or None where the table has none."""
  device = device or jax.devices()[0]
  info = device_info(device.device_kind)
  return info.bandwidth_gbs if info else None
