"""Our trainer's step against a plain PyTorch + transformers training loop, on this CPU.

``python benchmarks/train.py [--size 30m] [--batch 8] [--seq 128] [--steps 4] [--warmup 1]``

Both sides train the same GPT-J (``--size``; 30m: d_model 512, 6 layers, 8 heads, rotary 32,
d_ff 2048, vocabulary 16384, about 36M parameters) from the same float32 weights on the same
rows of a small synthetic tokenize output:

- ours: the train stage's ``Trainer`` (the mesh, sharded params, the GPT-J recipe's
  optimiser: AdamW with decay on matrices, global-norm clip 1.0, warmup-cosine schedule)
  and its jitted ``step_fn``, fed the batches its ``Loader`` hands out;
- the tool people would use instead: ``transformers.GPTJForCausalLM`` (eager attention, the
  only kind GPT-J has on CPU) with ``torch.optim.AdamW`` (same betas, eps, weight decay),
  ``clip_grad_norm_(1.0)`` and a ``LambdaLR`` warmup, ``loss.backward()`` and
  ``optimizer.step()``, with as many intra-op threads as this process may use cores.

The first step's losses are printed as a parity check (same weights, same rows). After
``--warmup`` untimed steps each, ``--steps`` rounds run one step of each side and one
reference matmul, so that a colleague's load on a shared machine hits all three alike; the
table gives medians. Tokens/s counts ``batch * seq`` predicted tokens a step. MFU is model
FLOPs (the trainer's ``flops_per_token``: 6N plus the attention score and value matmuls)
per second over the measured float32 matmul rate (``measured_peak_flops``, 2048^3), the
rate the train stage's own MFU metric uses on CPU.

Goals (issue 6): ours >= 1.3x PyTorch tokens/s and >= 50% MFU. On a shared machine the
figures move from run to run; the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

SIZES: dict[str, dict[str, int]] = {
    "30m": dict(vocab_size=16384, d_model=512, n_layers=6, n_heads=8, d_ff=2048, rotary_dim=32),
    "tiny": dict(vocab_size=1024, d_model=128, n_layers=2, n_heads=4, d_ff=512, rotary_dim=16),
}
SPEEDUP_GOAL = 1.3
MFU_GOAL = 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="30m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    return parser.parse_args(argv)


def cores() -> int:
    """CPUs this process may run on: what XLA's CPU client sizes its thread pool by."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def synthetic_tokenized(out: str, seq: int, rows: int, vocab: int) -> str:
    """A tokenize output (the stage's manifest and Arrow shards) of random rows."""
    from stages.tokenize.packing import RowWriter

    rng = np.random.default_rng(0)
    splits = {}
    for split, count in (("train", rows), ("val", 8)):
        os.makedirs(os.path.join(out, split), exist_ok=True)
        path = f"{split}/shard-00000.arrow"
        with open(os.path.join(out, path), "wb") as f:
            writer = RowWriter(f, seq + 1, np.dtype(np.uint16))
            writer.add(rng.integers(0, vocab, count * (seq + 1), dtype=np.uint16))
            writer.close()
        shard = {"path": path, "rows": count, "first_row": 0, "source": "synthetic"}
        splits[split] = {"rows": count, "shards": [shard], "components": {}}
    manifest = {
        "format": "meshline.tokens.v1",
        "seq_len": seq,
        "row_len": seq + 1,
        "dtype": "uint16",
        "eos_id": vocab - 1,
        "tokenizer": {"kind": "synthetic", "fingerprint": "synthetic", "vocab_size": vocab},
        "splits": splits,
        "mixture": None,
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return out


def ours(args: argparse.Namespace, tokenized: str, output: str) -> tuple[Any, Callable, Any]:
    """Our trainer for ``args``, a function doing one of its steps (returns the loss), and
    its initial float32 params."""
    import jax
    import jax.numpy as jnp

    from stages.train.config import TrainConfig
    from stages.train.loader import Loader
    from stages.train.trainer import Trainer

    config = TrainConfig(
        model="gptj-tiny",
        model_overrides={**SIZES[args.size], "max_len": max(args.seq, 512)},
        dtype="float32",
        global_batch=args.batch,
        steps=args.warmup + args.steps + 1,
        optimizer={"warmup_steps": 2, "anneal_steps": 100},
    )
    trainer = Trainer(config, tokenized, output)
    state = trainer.initial_state()
    loader = Loader(trainer.train_data, args.batch, 1, config.seed)
    initial = jax.device_get(state["params"])
    current = {"params": state["params"], "opt": state["opt_state"], "step": 0}

    def step(rows: np.ndarray) -> float:
        batch = jax.make_array_from_process_local_data(
            trainer.rows_sharding, rows, trainer.rows_shape
        )
        params, opt, metrics = trainer.step_fn(
            current["params"], current["opt"], jnp.int32(current["step"]), batch
        )
        current.update(params=params, opt=opt, step=current["step"] + 1)
        return float(metrics["loss"])

    return trainer, step, (initial, loader)


def pytorch(trainer: Any, initial: dict, threads: int) -> Callable[[np.ndarray], float]:
    """transformers' GPT-J with the same weights and a standard AdamW loop: one step."""
    import torch
    import torch.nn.functional as F

    from stages.train.hf_mapping import to_transformers

    torch.set_num_threads(threads)
    model = to_transformers(trainer.model, initial, bos_token_id=None, eos_token_id=None).train()
    opt = trainer.config.optimizer
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    adamw = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=opt.lr,
        betas=(opt.b1, opt.b2),
        eps=opt.eps,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(adamw, lambda s: min(1.0, s / opt.warmup_steps))

    def step(rows: np.ndarray) -> float:
        tokens = torch.from_numpy(rows.reshape(-1, rows.shape[-1]).astype(np.int64))
        adamw.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.clip)
        adamw.step()
        schedule.step()
        return float(loss.detach())

    return step


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import jax
    import torch

    from stages.train.model_config import param_count
    from stages.train.trainer import flops_per_token, measured_peak_flops

    n_cores = cores()
    with tempfile.TemporaryDirectory() as tmp:
        rows = args.batch * (args.warmup + args.steps + 2)
        vocab = SIZES[args.size]["vocab_size"]
        tokenized = synthetic_tokenized(f"{tmp}/tok", args.seq, rows, vocab)
        trainer, ours_step, (initial, loader) = ours(args, tokenized, f"{tmp}/out")
        torch_step = pytorch(trainer, initial, n_cores)
        model = trainer.model
        tokens = args.batch * args.seq
        flops = flops_per_token(model, args.seq) * tokens
        print(
            f"GPT-J {args.size}: d_model {model.d_model}, layers {model.n_layers}, heads "
            f"{model.n_heads}, d_ff {model.d_ff}, rotary {model.rotary_dim}, vocab "
            f"{model.vocab_size}; {param_count(model) / 1e6:.1f}M params; batch {args.batch} x "
            f"seq {args.seq} = {tokens} tokens, {flops / 1e9:.1f} GFLOP a step; float32"
        )
        print(
            f"jax {jax.__version__} ({n_cores} cores), torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); load average at start {load_average()}"
        )
        batches = [next(loader) for _ in range(args.warmup + args.steps + 1)]
        loader.close()
        print(f"parity, first step loss: ours {ours_step(batches[0]):.6f}, ", end="")
        print(f"torch {torch_step(batches[0]):.6f}")
        for rows_ in batches[1 : 1 + args.warmup]:
            ours_step(rows_)
            torch_step(rows_)
        times: dict[str, list[float]] = {"ours": [], "torch": [], "matmul": []}
        for rows_ in batches[1 + args.warmup :]:
            times["ours"].append(timed(lambda r=rows_: ours_step(r)))
            times["torch"].append(timed(lambda r=rows_: torch_step(r)))
            times["matmul"].append(1.0 / measured_peak_flops(2048, 2))
    med = {name: statistics.median(t) for name, t in times.items()}
    peak = 1.0 / med["matmul"]
    report(med, tokens, flops, peak, args.steps)


def report(med: dict[str, float], tokens: int, flops: float, peak: float, steps: int) -> None:
    print(f"\nreference float32 matmul 2048^3: {peak / 1e9:.1f} GFLOP/s (median of {steps})")
    header = f"{'':8}{'s/step':>9}{'tokens/s':>11}{'GFLOP/s':>10}{'MFU':>7}"
    print(header)
    print("-" * len(header))
    for name in ("ours", "torch"):
        seconds = med[name]
        print(
            f"{name:8}{seconds:>9.3f}{tokens / seconds:>11.0f}{flops / seconds / 1e9:>10.1f}"
            f"{flops / seconds / peak:>7.0%}"
        )
    speedup = med["torch"] / med["ours"]
    mfu = flops / med["ours"] / peak
    print(
        f"\nours / torch tokens/s: {speedup:.2f}x (goal {SPEEDUP_GOAL}x: "
        f"{'MET' if speedup >= SPEEDUP_GOAL else 'MISSED'}); our MFU {mfu:.0%} (goal "
        f"{MFU_GOAL:.0%}: {'MET' if mfu >= MFU_GOAL else 'MISSED'}); load average at end "
        f"{load_average()}"
    )


if __name__ == "__main__":
    sys.exit(main())
