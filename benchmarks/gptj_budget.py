"""Compute, time and cost budget of the GPT-J-6B pretraining run on TPU pod slices.

``python benchmarks/gptj_budget.py [--mfu 0.40] [--price v4-128=3.22]...`` prints, as a
Markdown table, what cluster/README.md quotes: parameters (from the ``gptj-6b`` preset that
train, convert and evaluate share), tokens, training FLOPs (6ND plus attention), and for
each slice the hours, chip-hours and on-demand cost at an assumed model-FLOPs utilisation.

Everything here is arithmetic on stated numbers; nothing is measured. The assumptions:

- Tokens: mesh-transformer-jax's 6B_roto_256 recipe, 512 sequences x 2048 tokens per step.
  GPT-J was trained for 383,500 steps (402B tokens); its config says total_steps 350,000.
- FLOPs per token: 6N for the parameter matmuls (forward + backward, N = every parameter,
  as mesh-transformer-jax counted) plus 12 * layers * seq_len * d_model for the attention
  score and value matmuls (full, not causal-halved: the kernel computes the masked half).
  Rematerialisation's extra forward pass is not counted (it is hardware, not model, FLOPs).
- MFU: model FLOPs (the count above) / peak bf16 FLOP/s. 40% is what mesh-transformer-jax
  reports for GPT-J on a v3-256 (by 6N against 13.4 PFLOP/s); the anchor line shows what
  its measured 151k tokens/s gives under this script's convention.
- Peak bf16 FLOP/s per chip from Google's Cloud TPU system-architecture pages: v3 123
  TFLOP/s (2 TensorCores), v4 275, v5p 459. A slice name counts TensorCores: 2 per chip.
- Prices are ASSUMPTIONS (on-demand list prices per chip-hour seen at the time of writing;
  v3 pod slices are sold only with a commitment, so its figure is the v3-8 device price per
  chip). Check https://cloud.google.com/tpu/pricing and pass --price SLICE=USD.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from stages.train.model_config import ModelConfig, param_count, preset

MEASURED_TOKENS_PER_S = 151_000
"""GPT-J's reported training throughput on a v3-256 (mesh-transformer-jax README)."""
REPORTED_PEAK_V3_256 = 13.4e15
"""The v3-256 peak mesh-transformer-jax divided by (105 TFLOP/s per chip, the 420 TFLOP/s
quoted for a v3-8 board); Google's current figure is 123 TFLOP/s per chip."""


@dataclass(frozen=True)
class Recipe:
    """The batch shape and step counts of mesh-transformer-jax's 6B_roto_256."""

    batch: int = 512
    seq_len: int = 2048
    steps_trained: int = 383_500
    steps_config: int = 350_000

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len

    @property
    def tokens_trained(self) -> int:
        return self.steps_trained * self.tokens_per_step

    @property
    def tokens_config(self) -> int:
        return self.steps_config * self.tokens_per_step


@dataclass(frozen=True)
class Slice:
    """A TPU pod slice: its name (TensorCores), peak bf16 FLOP/s per chip, assumed price."""

    name: str
    peak_tflops_per_chip: float
    usd_per_chip_hour: float
    cores_per_chip: int = 2

    @property
    def chips(self) -> int:
        return int(self.name.split("-")[1]) // self.cores_per_chip

    @property
    def peak_flops(self) -> float:
        return self.chips * self.peak_tflops_per_chip * 1e12


SLICES: tuple[Slice, ...] = (
    Slice("v3-256", peak_tflops_per_chip=123, usd_per_chip_hour=2.00),
    Slice("v4-128", peak_tflops_per_chip=275, usd_per_chip_hour=3.22),
    Slice("v5p-128", peak_tflops_per_chip=459, usd_per_chip_hour=4.20),
)


def flops_per_token(model: ModelConfig, seq_len: int) -> tuple[int, int]:
    """(6N, attention) training FLOPs per token: forward + backward = 3x the forward."""
    dense = 6 * param_count(model)
    attention = 12 * model.n_layers * seq_len * model.d_model
    return dense, attention


@dataclass(frozen=True)
class Budget:
    """Training FLOPs and, per slice, time and cost at one MFU."""

    params: int
    tokens: int
    dense_flops: float
    attention_flops: float

    @property
    def flops(self) -> float:
        return self.dense_flops + self.attention_flops

    def seconds(self, tpu: Slice, mfu: float) -> float:
        return self.flops / (tpu.peak_flops * mfu)

    def cost(self, tpu: Slice, mfu: float) -> float:
        return self.seconds(tpu, mfu) / 3600 * tpu.chips * tpu.usd_per_chip_hour


def budget(model: ModelConfig, recipe: Recipe, tokens: int) -> Budget:
    dense, attention = flops_per_token(model, recipe.seq_len)
    return Budget(param_count(model), tokens, float(dense) * tokens, float(attention) * tokens)


def report(model: ModelConfig, recipe: Recipe, slices: tuple[Slice, ...], mfu: float) -> str:
    """The Markdown text cluster/README.md quotes."""
    trained = budget(model, recipe, recipe.tokens_trained)
    config = budget(model, recipe, recipe.tokens_config)
    per_token = trained.flops / trained.tokens
    lines = [
        f"parameters            {trained.params:,}",
        f"tokens as trained     {recipe.steps_trained:,} steps x {recipe.batch} x "
        f"{recipe.seq_len} = {trained.tokens:,} ({trained.tokens / 1e9:.1f}B)",
        f"tokens as configured  {recipe.steps_config:,} steps x {recipe.batch} x "
        f"{recipe.seq_len} = {config.tokens:,} ({config.tokens / 1e9:.1f}B)",
        f"FLOPs, 402B tokens    6ND {trained.dense_flops:.3e} + attention "
        f"{trained.attention_flops:.3e} = {trained.flops:.3e}",
        f"FLOPs, 367B tokens    6ND {config.dense_flops:.3e} + attention "
        f"{config.attention_flops:.3e} = {config.flops:.3e}",
    ]
    v3 = next((s for s in slices if s.name == "v3-256"), None)
    if v3 is not None:
        days = trained.tokens / MEASURED_TOKENS_PER_S / 86400
        mfu_here = MEASURED_TOKENS_PER_S * per_token / v3.peak_flops
        dense_per_token = trained.dense_flops / trained.tokens
        mfu_reported = MEASURED_TOKENS_PER_S * dense_per_token / REPORTED_PEAK_V3_256
        lines.append(
            f"anchor (GPT-J, v3-256) {MEASURED_TOKENS_PER_S:,} tokens/s = {days:.1f} days for "
            f"402B tokens; MFU {mfu_here:.1%} by this table's count, {mfu_reported:.1%} "
            "by 6N against the 13.4 PFLOP/s it reported"
        )
    lines += [
        "",
        "| slice | chips | peak PFLOP/s | MFU | tokens/s | days (402B) | days (367B) "
        "| chip-hours (402B) | USD/chip-h (assumed) | cost (402B) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for tpu in slices:
        seconds = trained.seconds(tpu, mfu)
        lines.append(
            f"| {tpu.name} | {tpu.chips} | {tpu.peak_flops / 1e15:.1f} | {mfu:.0%} "
            f"| {tpu.peak_flops * mfu / per_token:,.0f} | {seconds / 86400:.1f} "
            f"| {config.seconds(tpu, mfu) / 86400:.1f} | {seconds / 3600 * tpu.chips:,.0f} "
            f"| {tpu.usd_per_chip_hour:.2f} | ${trained.cost(tpu, mfu):,.0f} |"
        )
    return "\n".join(lines)


def _price(text: str) -> tuple[str, float]:
    name, _, usd = text.partition("=")
    try:
        return name, float(usd)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--price wants SLICE=USD, got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gptj-6b", help="model preset (model_config.py)")
    parser.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation")
    parser.add_argument(
        "--price", type=_price, action="append", default=[], help="SLICE=USD per chip-hour"
    )
    args = parser.parse_args(argv)
    prices = dict(args.price)
    unknown = set(prices) - {s.name for s in SLICES}
    if unknown:
        parser.error(f"no slice named {', '.join(sorted(unknown))}")
    slices = tuple(
        Slice(s.name, s.peak_tflops_per_chip, prices.get(s.name, s.usd_per_chip_hour))
        for s in SLICES
    )
    print(report(preset(args.preset), Recipe(), slices, args.mfu))


if __name__ == "__main__":
    main()
