"""Our GPT-J against transformers' PyTorch GPT-J on this CPU, and against the CPU's matmul rate.

``python benchmarks/model.py [--size 100m] [--batch 2] [--seq 512] [--repeats 5] [--dtype f32]``
builds one GPT-J-style config, initialises our parameters, loads the same weights into
``transformers.GPTJForCausalLM`` through ``stages/train/hf_mapping.py`` (torch, CPU, float32,
eager attention: the only attention GPT-J has on CPU), checks that both compute the same
logits, and then times, on the same random token batch:

- forward: our jitted ``forward`` against ``model(input_ids)`` under ``torch.no_grad``;
- forward+backward: ``jax.value_and_grad`` (jitted) of the train stage's own loss,
  ``optim.lm_loss`` (mean next-token cross-entropy as logsumexp minus the target logit, the
  function every training step differentiates), against ``F.cross_entropy`` and
  ``loss.backward()`` (gradients of every parameter, both sides);
- a large ``jnp.matmul`` (``--matmul-n``, float32) as the machine's achievable FLOP/s.

The process runs with ``stages/train/malloc.py``'s settings, as the train stage's CPU hosts
do (``--glibc-defaults`` leaves glibc's own); they apply to both frameworks, which share
the process.

Every timed call blocks until its results are ready. After ``--warmup`` untimed calls of each,
``--repeats`` rounds run the measurements one after the other (3 matmuls, our forward,
torch's, our forward+backward, torch's), so that a colleague's load on a shared machine hits
both frameworks and the matmul reference alike; the table gives the median of each. The
process's CPU seconds per call (all threads) are printed too: on a loaded machine they
compare the work of the two frameworks more steadily than wall time does. Torch gets as
many intra-op threads as the cores JAX's CPU client uses (this process's CPU affinity).

FLOPs (model FLOPs, as benchmarks/gptj_budget.py counts them): forward = 2 * N * tokens +
4 * layers * seq^2 * d_model per sequence, where N counts the parameters that multiply
activations (every parameter but the embedding table, which is a lookup: 124M of the 100m
config's 162M; the lm_head is counted) and the attention term counts the score and value
matmuls in full (not halved for the causal mask, which the kernels do not skip either).
Forward+backward = 3 x forward. Model FLOPs utilisation (MFU) is our achieved FLOP/s over
the measured matmul FLOP/s. LayerNorm, softmax, gelu and rotary are not counted.

The ``100m`` config is GPT-J's shape scaled to GPT-2-small width (d_model 768, 12 layers,
12 heads, rotary_dim 64 as in GPT-J-6B, d_ff 3072, GPT-J's vocabulary 50400). Sequence 512
with batch 2 (1024 tokens a step): the step is long enough (seconds) to time reliably on two
shared cores, short enough for several rounds in a few minutes, and attention is a
realistic ~7% of the FLOPs; ``--seq 1024 --batch 1`` or ``--seq 2048`` shift weight to the
attention term.

Goals (issue 5): ours >= 1.3x PyTorch tokens/s, forward and forward+backward; our MFU >= 50%
of the measured matmul rate on the ~100M config. The script reports what it measures; on a
shared machine the figures move from run to run (the load average is printed with them).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

SIZES: dict[str, dict[str, int]] = {
    "100m": dict(vocab_size=50400, d_model=768, n_layers=12, n_heads=12, d_ff=3072, rotary_dim=64),
    "tiny": dict(vocab_size=1024, d_model=128, n_layers=4, n_heads=4, d_ff=512, rotary_dim=16),
}
SPEEDUP_GOAL = 1.3
MFU_GOAL = 0.5
MATMUL_CALLS_PER_ROUND = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="100m")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
    parser.add_argument(
        "--dtype",
        choices=["f32", "bf16"],
        default="f32",
        help="compute dtype: bf16 runs our model with bfloat16 compute (float32 params) "
        "against torch autocast bfloat16, and the matmul reference in bfloat16",
    )
    parser.add_argument("--matmul-n", type=int, default=2048, help="reference matmul n x n x n")
    parser.add_argument(
        "--scan-unroll", type=int, default=1, help="layers per layer-scan iteration (config)"
    )
    parser.add_argument(
        "--remat", choices=["none", "full", "dots", "dots_no_batch"], default="none"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--glibc-defaults",
        action="store_true",
        help="keep glibc's malloc defaults instead of the train hosts' settings",
    )
    return parser.parse_args(argv)


def cores() -> int:
    """CPUs this process may run on: what XLA's CPU client sizes its thread pool by."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all threads)."""
    t = os.times()
    return t.user + t.system


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds of one call."""
    cpu, start = cpu_seconds(), time.perf_counter()
    fn()
    return time.perf_counter() - start, cpu_seconds() - cpu


def model_flops(n_matmul_params: int, n_layers: int, d_model: int, batch: int, seq: int) -> float:
    """Forward model FLOPs of one batch (see the module docstring)."""
    return 2.0 * n_matmul_params * batch * seq + 4.0 * n_layers * seq**2 * d_model * batch


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from stages.train.malloc import keep_freed_memory

    malloc = "glibc defaults" if args.glibc_defaults else "train host settings"
    if not args.glibc_defaults and not keep_freed_memory():
        malloc = "not glibc: defaults"
    # Imported here so that --help is instant, and after the malloc settings (see there).
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F
    from flax import linen as nn

    from stages.train.hf_mapping import to_transformers
    from stages.train.model import forward, init_params
    from stages.train.model_config import gptj, param_count
    from stages.train.optim import lm_loss

    n_cores = cores()
    torch.set_num_threads(n_cores)
    bf16 = args.dtype == "bf16"
    config = gptj(
        **SIZES[args.size],
        max_len=max(args.seq, 2048),
        dtype="bfloat16" if bf16 else "float32",
        scan_unroll=args.scan_unroll,
        remat=args.remat,
    )
    n_params = param_count(config)
    n_matmul = n_params - config.vocab_size * config.d_model
    fwd_flops = model_flops(n_matmul, config.n_layers, config.d_model, args.batch, args.seq)
    tokens_per_step = args.batch * args.seq

    print(
        f"config {args.size}: d_model {config.d_model}, layers {config.n_layers}, heads "
        f"{config.n_heads}, d_ff {config.d_ff}, rotary {config.rotary_dim}, vocab "
        f"{config.vocab_size}; {n_params / 1e6:.1f}M params ({n_matmul / 1e6:.1f}M in matmuls)"
    )
    print(
        f"batch {args.batch} x seq {args.seq} = {tokens_per_step} tokens; dtype {args.dtype}; "
        f"forward {fwd_flops / 1e9:.1f} GFLOP, forward+backward {3 * fwd_flops / 1e9:.1f} GFLOP"
    )
    print(
        f"jax {jax.__version__} ({jax.devices()[0].platform}, {n_cores} cores), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); malloc {malloc}; "
        f"load average at start {load_average()}"
    )

    params = nn.unbox(init_params(config, jax.random.key(args.seed)))
    hf = to_transformers(config, jax.device_get(params), bos_token_id=None, eos_token_id=None)
    rng = np.random.default_rng(args.seed)
    tokens_np = rng.integers(0, config.vocab_size, (args.batch, args.seq + 1), dtype=np.int64)
    inputs_np, targets_np = tokens_np[:, :-1], tokens_np[:, 1:]
    rows, inputs = jnp.asarray(tokens_np, jnp.int32), jnp.asarray(inputs_np, jnp.int32)
    inputs_pt, targets_pt = torch.from_numpy(inputs_np), torch.from_numpy(targets_np)

    def ours_forward() -> jax.Array:
        return forward(config, params, inputs).block_until_ready()

    ours_grad = jax.jit(jax.value_and_grad(partial(lm_loss, config), has_aux=True))

    def ours_step() -> tuple[jax.Array, dict]:
        return jax.block_until_ready(ours_grad(params, rows))

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def torch_forward() -> torch.Tensor:
        with torch.no_grad(), autocast:
            return hf(inputs_pt).logits

    def torch_step() -> torch.Tensor:
        hf.zero_grad(set_to_none=True)
        with autocast:
            logits = hf(inputs_pt).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets_pt.flatten())
        loss.backward()
        return loss.detach()

    n = args.matmul_n
    mm_dtype = jnp.bfloat16 if bf16 else jnp.float32
    a = jax.random.normal(jax.random.key(1), (n, n), mm_dtype)
    b = jax.random.normal(jax.random.key(2), (n, n), mm_dtype)
    matmul = jax.jit(jnp.matmul)

    def ref_matmul() -> jax.Array:
        return matmul(a, b).block_until_ready()

    # Same function on both sides: logits and loss agree before anything is timed.
    ours_logits = np.asarray(ours_forward())
    torch_logits = torch_forward().float().numpy()
    rel = np.abs(ours_logits - torch_logits).max() / np.abs(torch_logits).max()
    ours_l = float(ours_step()[0][0])
    torch_l = float(torch_step())
    print(
        f"parity: logits max |diff| / max |logit| = {rel:.1e}; loss ours {ours_l:.6f}, "
        f"torch {torch_l:.6f}"
    )
    rss_after_compile = peak_rss_gib()

    cases: dict[str, Callable[[], Any]] = {
        "matmul": ref_matmul,
        "ours forward": ours_forward,
        "torch forward": torch_forward,
        "ours fwd+bwd": ours_step,
        "torch fwd+bwd": torch_step,
    }
    for _ in range(args.warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            # The matmul is short: a few calls a round give its median more samples.
            for _ in range(MATMUL_CALLS_PER_ROUND if name == "matmul" else 1):
                wall, used = timed(fn)
                times[name].append(wall)
                cpu[name].append(used)
    med = {name: statistics.median(t) for name, t in times.items()}
    med_cpu = {name: statistics.median(t) for name, t in cpu.items()}
    spread = {name: (min(t), max(t)) for name, t in times.items()}

    matmul_rate = 2.0 * n**3 / med["matmul"]
    rows = []
    for kind, flops in (("forward", fwd_flops), ("fwd+bwd", 3 * fwd_flops)):
        o, t = med[f"ours {kind}"], med[f"torch {kind}"]
        rows.append((kind, o, t, flops))
    print()
    print(
        f"reference: jnp.matmul {n}x{n}x{n} {args.dtype}: median {med['matmul'] * 1e3:.0f} ms "
        f"= {matmul_rate / 1e9:.1f} GFLOP/s"
    )
    header = (
        f"{'':10}{'ours tok/s':>12}{'torch tok/s':>13}{'speed-up':>10}"
        f"{'ours GFLOP/s':>14}{'torch GFLOP/s':>15}{'ours MFU':>10}{'torch MFU':>11}"
    )
    print(header)
    print("-" * len(header))
    verdicts = []
    for kind, o, t, flops in rows:
        speedup = t / o
        mfu_o, mfu_t = flops / o / matmul_rate, flops / t / matmul_rate
        print(
            f"{kind:10}{tokens_per_step / o:>12.0f}{tokens_per_step / t:>13.0f}{speedup:>9.2f}x"
            f"{flops / o / 1e9:>14.1f}{flops / t / 1e9:>15.1f}{mfu_o:>9.0%}{mfu_t:>11.0%}"
        )
        verdicts.append(
            f"{kind}: speed-up {speedup:.2f}x vs goal {SPEEDUP_GOAL}x "
            f"{'MET' if speedup >= SPEEDUP_GOAL else 'MISSED'}; MFU {mfu_o:.0%} vs goal "
            f"{MFU_GOAL:.0%} {'MET' if mfu_o >= MFU_GOAL else 'MISSED'}"
        )
    print()
    print("\n".join(verdicts))
    print()
    print(
        f"median of {args.repeats} rounds: wall seconds per call (min-max), and CPU seconds "
        f"per call (this process, all threads; less sensitive to other load, {n_cores} cores):"
    )
    for name in cases:
        lo, hi = spread[name]
        print(f"  {name:14} {med[name]:7.3f} s ({lo:.3f}-{hi:.3f})   cpu {med_cpu[name]:7.3f} s")
    for kind in ("forward", "fwd+bwd"):
        o, t = med_cpu[f"ours {kind}"], med_cpu[f"torch {kind}"]
        # A tiny config's calls can round to zero CPU seconds.
        ratio = f"{t / o:.2f}x" if o > 0 else "n/a (too short to measure)"
        print(f"  {kind}: torch / ours CPU seconds = {ratio}")
    print(
        f"peak RSS {peak_rss_gib():.2f} GiB (after compiling and parity check "
        f"{rss_after_compile:.2f} GiB); load average at end {load_average()}"
    )


if __name__ == "__main__":
    sys.exit(main())
