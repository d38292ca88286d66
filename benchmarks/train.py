"""Our training step against PyTorch + transformers' GPT-J, on whatever device this host has.

``python benchmarks/train.py [--platform auto|gpu|tpu|cpu] [--sizes 1b,100m] [--seq 2048]
[--batch 4] [--attention all] [--remat dots_no_batch] [--dtype bfloat16] [--steps 5]
[--warmup 2]``

For each size, every side trains the same GPT-J from the same weights on the same random
token rows, one full optimiser step at a time:

- ours: the train stage's step (``stages.train.optim.train_step``: the GPT-J recipe's AdamW
  chain, float32 master weights, matmuls in ``--dtype``) jitted over a mesh of every local
  device (FSDP), once per attention implementation the platform has (``--attention``;
  GPU: xla and cudnn, TPU: xla and splash, CPU: xla; ``stages/train/attention.py``);
- the tool people would use instead: ``transformers.GPTJForCausalLM`` with sdpa attention
  under ``torch.autocast`` to ``--dtype``, ``torch.optim.AdamW``, ``clip_grad_norm_(1.0)``,
  ``loss.backward()`` and ``optimizer.step()``, on the same device (CUDA or CPU; PyTorch has
  no TPU backend here, so on TPU ours runs alone).

The first step's losses are printed as a parity check. After ``--warmup`` untimed steps,
``--steps`` rounds run one step of each side in turn, so a neighbour's load hits all alike;
the table gives medians. Tokens/s counts ``batch * seq`` predicted tokens. MFU is model FLOPs
(``stages/train/mfu.py``: 6N plus attention scores and values) per second over the peak: on
an accelerator its dense bf16 peak (``mfu.DEVICE_PEAKS``, from the data sheets) times the
devices, on CPU a ``--dtype`` matmul measured in the same rounds.

Sizes (GPT-J's shape: parallel residual, rotary 64, vocabulary 50400): 1b is d_model 2048,
16 layers, 16 heads of 128, d_ff 8192 (1.0B parameters); 100m is d_model 768, 12 layers, 12
heads, d_ff 3072; 30m (the CPU default) d_model 512, 6 layers, vocabulary 16384; tiny is
for smoke tests. Defaults per platform: accelerators 1b and 100m at seq 2048, batch 4, remat
dots_no_batch, bfloat16; CPU 30m at seq 256, batch 4, float32, which finishes in a minute on
two cores.

Goals (issue 18, on an H100): the 1b config at >= 50% MFU with cuDNN attention and >= 1.3x
PyTorch's tokens/s. The model, optimiser and step import without Ray or MLflow, so this runs
on a bare accelerator image carrying only pydantic besides JAX and torch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES: dict[str, dict[str, int]] = {
    "1b": dict(vocab_size=50400, d_model=2048, n_layers=16, n_heads=16, d_ff=8192, rotary_dim=64),
    "100m": dict(vocab_size=50400, d_model=768, n_layers=12, n_heads=12, d_ff=3072, rotary_dim=64),
    "30m": dict(vocab_size=16384, d_model=512, n_layers=6, n_heads=8, d_ff=2048, rotary_dim=32),
    "tiny": dict(vocab_size=1024, d_model=128, n_layers=2, n_heads=4, d_ff=512, rotary_dim=16),
}
ATTENTION = {"gpu": ("xla", "cudnn"), "tpu": ("xla", "splash"), "cpu": ("xla",)}
"""What ``--attention all`` runs per platform (splash runs on CPU only in interpret mode,
far too slow to time)."""
ACCELERATOR_DEFAULTS = {
    "sizes": "1b,100m",
    "seq": 2048,
    "batch": 4,
    "remat": "dots_no_batch",
    "dtype": "bfloat16",
}
"""Batch 4 x 2048 and weight-matmul outputs saved (not the [seq, seq] scores the xla path
makes): our state, PyTorch's and both sides' activations fit one 80 GB H100 together."""
CPU_DEFAULTS = {"sizes": "30m", "seq": 256, "batch": 4, "remat": "none", "dtype": "float32"}
"""float32: XLA's CPU matmuls are slower in bfloat16 than in float32 (0.28 against 0.39
TFLOP/s for 2048^3 on this 2-core machine), while PyTorch's oneDNN bf16 path is not."""
SPEEDUP_GOAL = 1.3
MFU_GOAL = 0.5
Step = Callable[[np.ndarray], float]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--platform", choices=("auto", "gpu", "tpu", "cpu"), default="auto")
    parser.add_argument("--sizes", help="comma-separated, from: " + ", ".join(SIZES))
    parser.add_argument("--seq", type=int)
    parser.add_argument("--batch", type=int, help="sequences a step")
    parser.add_argument("--attention", default="all", help="all, or a comma-separated list")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"))
    parser.add_argument("--remat", choices=("none", "full", "dots", "dots_no_batch"))
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    return parser.parse_args(argv)


def use_platform(requested: str) -> str:
    """Point JAX at ``requested`` (before it loads) and return the platform it runs on."""
    if requested != "auto":
        os.environ["JAX_PLATFORMS"] = "cuda" if requested == "gpu" else requested
    # Both frameworks share the GPU: JAX takes memory as it needs it, not 75% up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    return jax.default_backend()


def with_defaults(args: argparse.Namespace, platform: str) -> argparse.Namespace:
    defaults = CPU_DEFAULTS if platform == "cpu" else ACCELERATOR_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.attention == "all":
        args.attention = ",".join(ATTENTION[platform])
    return args


def model_config(size: str, args: argparse.Namespace, attention: str, dtype: str | None = None):
    from stages.train.model_config import preset

    return preset(
        "gptj-tiny",
        **SIZES[size],
        max_len=max(args.seq, 2048),
        dtype=dtype or args.dtype,
        remat=args.remat,
        attention=attention,
    )


def ours(size: str, args: argparse.Namespace) -> tuple[dict[str, Step], dict]:
    """One training step of ours per attention implementation (each returns the loss) and
    the float32 initial params. The steps share one training state: memory for one copy
    of the 1b optimiser state, and the first round's steps all see the initial params (the
    recipe's first update is zero)."""
    import jax
    import jax.numpy as jnp

    from stages.train import optim, sharding
    from stages.train.config import OptimizerConfig

    attentions = args.attention.split(",")
    mesh = sharding.make_mesh(fsdp=jax.device_count())
    opt = OptimizerConfig(warmup_steps=2, anneal_steps=100)
    tx = optim.optimizer(opt, 1)
    with sharding.activation_sharding(mesh):
        params = sharding.init_sharded(model_config(size, args, "xla"), mesh, jax.random.key(0))
        initial = jax.device_get(params)
        state = {"params": params, "opt": jax.jit(tx.init)(params), "step": 0}
    rows_sharding = sharding.micro_batch_sharding(mesh)

    def step_of(attention: str) -> Step:
        model = model_config(size, args, attention)
        step_fn = jax.jit(
            partial(optim.train_step, model, tx, optim.schedule(opt)), donate_argnums=(0, 1)
        )

        def step(rows: np.ndarray) -> float:
            batch = jax.device_put(rows[None], rows_sharding)
            with sharding.activation_sharding(mesh):
                params, opt_state, metrics = step_fn(
                    state["params"], state["opt"], jnp.int32(state["step"]), batch
                )
            state.update(params=params, opt=opt_state, step=state["step"] + 1)
            return float(metrics["loss"])

        return step

    return {f"ours {a}": step_of(a) for a in attentions}, initial


def pytorch(size: str, args: argparse.Namespace, initial: dict, device: str) -> Step:
    """transformers' GPT-J with the same weights and a standard AdamW loop: one step."""
    import torch
    import torch.nn.functional as F

    from stages.train.config import OptimizerConfig
    from stages.train.hf_mapping import to_transformers

    config = model_config(size, args, "xla", dtype="float32")
    model = to_transformers(config, initial, bos_token_id=None, eos_token_id=None)
    model.set_attn_implementation("sdpa")
    model = model.to(device).train()
    opt = OptimizerConfig(warmup_steps=2, anneal_steps=100)
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    adamw = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=opt.lr,
        betas=(opt.b1, opt.b2),
        eps=opt.eps,
    )
    dtype = getattr(torch, args.dtype)

    def step(rows: np.ndarray) -> float:
        tokens = torch.from_numpy(rows.astype(np.int64)).to(device)
        adamw.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype, enabled=args.dtype != "float32"):
            logits = model(tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.clip)
        adamw.step()
        return float(loss.detach())

    return step


def matmul_step(dtype: str) -> Step:
    """A 2048^3 matmul in ``dtype``: the CPU's reachable rate, timed in the same rounds."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((2048, 2048), dtype)
    matmul = jax.jit(lambda a: a @ a)
    return lambda _: float(matmul(x).block_until_ready()[0, 0])


def timed(step: Step, rows: np.ndarray) -> float:
    start = time.perf_counter()
    step(rows)
    return time.perf_counter() - start


def run_size(size: str, args: argparse.Namespace, platform: str) -> dict[str, float]:
    """Median seconds a step of every side for one size."""
    import jax

    rng = np.random.default_rng(0)
    vocab = SIZES[size]["vocab_size"]
    batches = [
        rng.integers(0, vocab, (args.batch, args.seq + 1), dtype=np.int32)
        for _ in range(1 + args.warmup + args.steps)
    ]
    sides, initial = ours(size, args)
    if platform in ("gpu", "cpu"):
        sides["torch sdpa"] = pytorch(size, args, initial, "cuda" if platform == "gpu" else "cpu")
    if platform == "cpu":
        sides["matmul"] = matmul_step(args.dtype)
    losses = {name: step(batches[0]) for name, step in sides.items() if name != "matmul"}
    print("parity, first step loss: " + ", ".join(f"{n} {v:.4f}" for n, v in losses.items()))
    for rows in batches[1 : 1 + args.warmup]:
        for step in sides.values():
            step(rows)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for rows in batches[1 + args.warmup :]:
        for name, step in sides.items():
            times[name].append(timed(step, rows))
    del sides
    jax.clear_caches()
    return {name: statistics.median(t) for name, t in times.items()}


def report(size: str, args: argparse.Namespace, seconds: dict[str, float]) -> None:
    import jax

    from stages.train.mfu import device_peak_flops, flops_per_token
    from stages.train.model_config import param_count

    model = model_config(size, args, "xla")
    tokens = args.batch * args.seq
    flops = flops_per_token(model, args.seq) * tokens
    device = jax.devices()[0]
    if "matmul" in seconds:
        peak, source = 2 * 2048**3 / seconds.pop("matmul"), f"measured {args.dtype} matmul"
    else:
        peak = (device_peak_flops(device.device_kind) or float("nan")) * jax.device_count()
        source = f"{jax.device_count()} x {device.device_kind} dense bf16 peak"
    print(
        f"\nGPT-J {size}: {param_count(model) / 1e6:.0f}M params, batch {args.batch} x seq "
        f"{args.seq} = {tokens} tokens, {flops / 1e12:.2f} TFLOP a step, {args.dtype}; "
        f"peak {peak / 1e12:.1f} TFLOP/s ({source})"
    )
    header = f"{'':14}{'s/step':>9}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}"
    print(header + "\n" + "-" * len(header))
    for name, t in seconds.items():
        print(
            f"{name:14}{t:>9.3f}{tokens / t:>11.0f}{flops / t / 1e12:>9.2f}{flops / t / peak:>7.0%}"
        )
    best = min((n for n in seconds if n.startswith("ours")), key=seconds.get)
    mfu = flops / seconds[best] / peak
    line = f"best: {best}, MFU {mfu:.0%} (goal {MFU_GOAL:.0%})"
    if "torch sdpa" in seconds:
        speedup = seconds["torch sdpa"] / seconds[best]
        line += f"; {speedup:.2f}x torch's tokens/s (goal {SPEEDUP_GOAL}x)"
    print(line)


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, REPO)
    args = parse_args(argv)
    platform = use_platform(args.platform)
    args = with_defaults(args, platform)
    import jax

    print(
        f"jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}; "
        f"attention: {args.attention}; load average {os.getloadavg()[0]:.2f}"
    )
    for size in args.sizes.split(","):
        report(size, args, run_size(size, args, platform))


if __name__ == "__main__":
    main()
