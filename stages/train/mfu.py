"""Model FLOPs utilisation: the FLOPs a training step does and the peak a device could do.

MFU is model FLOPs per second over the devices' peak (PaLM, appendix B): the numerator
counts the matmuls the model needs, not rematerialised ones. The peak is, in order: the
train config's ``peak_flops_per_device``; on an accelerator, its dense bfloat16 peak from
``DEVICE_PEAKS`` (the vendors' data sheets, below); else (CPU) a float32 matmul measured
here, which is the rate such a machine can actually reach.

Imports JAX only, so ``benchmarks/train.py`` uses it on machines without Ray.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from stages.train.model_config import ModelConfig, param_count

DEVICE_PEAKS: dict[str, float] = {
    # Dense (not 2:4 sparse) bf16 FLOP/s of one JAX device, matched against the start of
    # ``device_kind`` with the longest entry first. Sources:
    # NVIDIA H100 SXM5 data sheet: 989.4 TFLOPS bf16 dense (1979 with sparsity).
    "NVIDIA H100": 989.4e12,
    # NVIDIA H200 data sheet: the H100's tensor cores, 989 TFLOPS bf16 dense.
    "NVIDIA H200": 989.4e12,
    # NVIDIA A100 data sheet: 312 TFLOPS bf16 dense.
    "NVIDIA A100": 312e12,
    # Google Cloud TPU system architecture pages, per chip (one JAX device per chip from v4
    # on; v3 shows each of its two cores as a device): v3 123 TFLOPS a chip.
    "TPU v3": 61.5e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls of forward and backward plus
    12 * layers * d_model * seq_len for attention scores and values (PaLM, appendix B);
    rematerialisation is not counted, so this is model (not hardware) FLOPs."""
    return 6 * param_count(model) + 12 * model.n_layers * model.d_model * seq_len


def measured_peak_flops(size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a float32 ``size``² matmul on this process's first device (the CPU peak
    we hold MFU to when no peak is configured)."""
    x = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        matmul(x).block_until_ready()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def device_peak_flops(device_kind: str) -> float | None:
    """The dense bf16 peak of a device named ``device_kind``, or None if the table lacks it."""
    for name in sorted(DEVICE_PEAKS, key=len, reverse=True):
        if device_kind.startswith(name):
            return DEVICE_PEAKS[name]
    return None


def peak_flops(configured_per_device: float | None = None) -> tuple[float, str]:
    """The FLOP/s of every device of the run together, which MFU is held to, and where the
    figure came from (for the log)."""
    device = jax.devices()[0]
    if configured_per_device:
        return configured_per_device * jax.device_count(), "configured"
    table = device_peak_flops(device.device_kind) if device.platform != "cpu" else None
    if table:
        return table * jax.device_count(), f"{device.device_kind} dense bf16 peak"
    # One matmul on a CPU device already uses every core of its host: one figure a process.
    measured = measured_peak_flops() * jax.process_count()
    return measured, f"float32 matmul measured on {device.device_kind}"
