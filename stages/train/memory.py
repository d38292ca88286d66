"""Ahead-of-time memory analysis of the training step on abstract shapes (nothing allocated).

``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m stages.train.memory gptj-6b
--mesh 1,1,8 --batch 1`` lowers and compiles one step (float32 params and Adam moments,
the preset's compute dtype, remat) for a virtual device mesh and prints XLA's per-device
argument, output and temporary bytes. Virtual CPU devices stand in for a TPU slice.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from stages.train import optim, sharding
from stages.train.model import init_params
from stages.train.model_config import ModelConfig, preset

GIB = 2**30


@dataclass(frozen=True)
class MemoryReport:
    """Per-device bytes of one compiled step, as XLA's memory analysis reports them."""

    mesh: tuple[int, int, int]
    batch: int
    seq_len: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    """Output bytes that reuse donated argument buffers (params and optimizer state)."""
    temp_bytes: int

    @property
    def peak_bytes(self) -> int:
        """Arguments, outputs not aliased to them, and temporaries: live at once at worst."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def describe(self) -> str:
        fields = ("argument", "output", "alias", "temp")
        sizes = ", ".join(f"{f} {getattr(self, f + '_bytes') / GIB:.2f}" for f in fields)
        return (
            f"mesh (data, fsdp, model)={self.mesh} batch={self.batch} seq={self.seq_len}: "
            f"{sizes}, peak {self.peak_bytes / GIB:.2f} GiB per device"
        )


def _with_shardings(tree: object, shardings: object) -> object:
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )


def compile_train_step(
    config: ModelConfig, mesh: Mesh, batch: int, seq_len: int
) -> jax.stages.Compiled:
    """One donated-buffer training step compiled for ``mesh`` from abstract inputs only."""
    tx = optim.optimizer(optim.OptimizerConfig(), grad_accum=1)
    param_shardings = sharding.param_shardings(config, mesh)
    params = jax.eval_shape(lambda r: nn.unbox(init_params(config, r)), jax.random.key(0))
    params = _with_shardings(params, param_shardings)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_state = jax.eval_shape(tx.init, params)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, opt_state, param_shardings, transform_non_params=lambda _: replicated
    )
    opt_state = _with_shardings(opt_state, opt_shardings)
    rows = jax.ShapeDtypeStruct(
        (1, batch, seq_len + 1), jnp.int32, sharding=sharding.micro_batch_sharding(mesh)
    )
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    train_step = partial(optim.train_step, config, tx, optim.schedule(optim.OptimizerConfig()))
    jitted = jax.jit(
        train_step,
        donate_argnums=(0, 1),
        out_shardings=(param_shardings, opt_shardings, replicated),
    )
    with sharding.activation_sharding(mesh):
        return jitted.lower(params, opt_state, step, rows).compile()


def memory_report(
    config: ModelConfig, mesh_shape: tuple[int, int, int], batch: int, seq_len: int
) -> MemoryReport:
    """Compile the step for a (data, fsdp, model) mesh and read XLA's memory analysis."""
    mesh = sharding.make_mesh(*mesh_shape)
    analysis = compile_train_step(config, mesh, batch, seq_len).memory_analysis()
    return MemoryReport(
        mesh=mesh_shape,
        batch=batch,
        seq_len=seq_len,
        argument_bytes=analysis.argument_size_in_bytes,
        output_bytes=analysis.output_size_in_bytes,
        alias_bytes=analysis.alias_size_in_bytes,
        temp_bytes=analysis.temp_size_in_bytes,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", help="model preset, e.g. gptj-6b")
    parser.add_argument("--mesh", default="1,1,8", help="data,fsdp,model (default 1,1,8: v3-8)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument(
        "--remat", default="full", choices=["none", "full", "dots", "dots_no_batch"]
    )
    args = parser.parse_args(argv)
    config = preset(args.preset, dtype=args.dtype, remat=args.remat)
    try:
        data, fsdp, model = (int(n) for n in args.mesh.split(","))
    except ValueError:
        parser.error("--mesh needs three integer sizes: data,fsdp,model")
    print(memory_report(config, (data, fsdp, model), args.batch, args.seq_len).describe())


if __name__ == "__main__":
    main()
