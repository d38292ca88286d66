"""The train stage's config: model, mesh, batch, recipe, checkpoints, placement, and the
model config a run trains (``training_model_config``).

Only pydantic here (no JAX), so the stage registry and the executor import it cheaply; the
training workers import the JAX code.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.stage import StageConfig
from stages.train.model_config import ModelConfig, preset

Recipe = Literal["gptj", "neox-20b"]

_RECIPE_FIELDS = [
    "lr",
    "end_lr",
    "warmup_steps",
    "anneal_steps",
    "weight_decay",
    "b1",
    "b2",
    "eps",
    "clip",
]
_RECIPE_VALUES: dict[str, tuple[float | int, ...]] = {
    # mesh-transformer-jax configs/6B_roto_256.json
    "gptj": (1.2e-4, 1.2e-5, 3000, 300000, 0.1, 0.9, 0.999, 1e-8, 1.0),
    # gpt-neox configs/20B.yml: train_iters 150000, warmup 0.01, cosine to min_lr
    "neox-20b": (0.97e-4, 0.97e-5, 1500, 148500, 0.01, 0.9, 0.95, 1e-8, 1.0),
}
RECIPES: dict[str, dict[str, float | int]] = {
    name: dict(zip(_RECIPE_FIELDS, values, strict=True)) for name, values in _RECIPE_VALUES.items()
}
"""Each recipe's optimiser fields and values."""


class OptimizerConfig(BaseModel):
    """One recipe's optimiser and schedule; fields left out take the recipe's values."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    recipe: Recipe = "gptj"
    """Whose numbers fill the fields not given: mesh-transformer-jax's GPT-J 6B or NeoX-20B."""
    lr: float = Field(gt=0)
    """Peak learning rate, reached at the end of warmup."""
    end_lr: float = Field(ge=0)
    """Learning rate after the cosine anneal, held to the end."""
    warmup_steps: int = Field(gt=0)
    """Steps of linear warmup from 0 (the first update has lr 0)."""
    anneal_steps: int = Field(gt=0)
    """Steps of cosine decay from ``lr`` to ``end_lr`` after warmup."""
    weight_decay: float = Field(ge=0)
    """Decoupled weight decay, applied only to per-layer matrices (ndim > 1)."""
    b1: float = Field(gt=0, lt=1)
    """Adam beta1."""
    b2: float = Field(gt=0, lt=1)
    """Adam beta2."""
    eps: float = Field(gt=0)
    """Adam epsilon."""
    clip: float = Field(gt=0)
    """Global-norm gradient clip, applied to the mean gradient of the step."""

    @model_validator(mode="before")
    @classmethod
    def _fill_from_recipe(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        recipe = data.get("recipe", "gptj")
        if recipe not in RECIPES:
            raise ValueError(f"unknown optimizer recipe {recipe!r}; known: {', '.join(RECIPES)}")
        return {**RECIPES[recipe], **data}


class MeshConfig(BaseModel):
    """Sizes of the (data, fsdp, model) device mesh; one size may be -1: the rest of the
    devices."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    data: int = 1
    """Pure data-parallel replicas."""
    fsdp: int = -1
    """Data-parallel replicas that also shard parameters and optimiser state."""
    model: int = 1
    """Tensor-parallel ways (heads, MLP width, vocabulary); GPT-J 6B used 8."""

    @model_validator(mode="after")
    def _check(self) -> MeshConfig:
        sizes = (self.data, self.fsdp, self.model)
        if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh sizes {sizes}: positive, at most one -1")
        return self

    def resolve(self, devices: int) -> tuple[int, int, int]:
        """The three sizes for ``devices`` devices, -1 filled in."""
        sizes = [self.data, self.fsdp, self.model]
        known = -1 * sizes[0] * sizes[1] * sizes[2] if -1 in sizes else None
        if known is not None:
            if devices % known:
                raise ValueError(f"mesh {tuple(sizes)} does not divide {devices} devices")
            sizes[sizes.index(-1)] = devices // known
        if sizes[0] * sizes[1] * sizes[2] != devices:
            raise ValueError(
                f"mesh {tuple(sizes)} needs {sizes[0] * sizes[1] * sizes[2]} "
                f"devices, there are {devices}"
            )
        return sizes[0], sizes[1], sizes[2]


class PlacementConfig(BaseModel):
    """Where the training workers run: a Ray Train worker group, one worker (one JAX process)
    per host, the same training code on each."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    platform: Literal["cpu", "gpu", "tpu"] = "cpu"
    """cpu: ``hosts`` local workers with ``devices_per_host`` virtual devices each, joined over
    127.0.0.1 (gloo); gpu: ``hosts`` workers, one per node, each with ``devices_per_host``
    GPUs; tpu: a worker per TPU VM host of ``slices`` slices of ``topology``."""
    hosts: int = Field(default=1, gt=0)
    """Workers on CPU and GPU; on TPU the slices' hosts, which Ray's tables give."""
    devices_per_host: int = Field(default=1, gt=0)
    """Virtual CPU devices or GPUs per worker; on TPU the chips per host, from Ray's tables."""
    cpus_per_host: float = Field(default=1, ge=0)
    """CPUs each CPU or GPU worker reserves."""
    topology: str | None = None
    """TPU slice topology as Ray names it, e.g. ``2x2x4`` (v4-32), ``4x4x4`` (v5p-128)."""
    accelerator_type: str | None = None
    """TPU generation as Ray names it: ``TPU-V3``, ``TPU-V4``, ``TPU-V5P``,
    ``TPU-V5LITEPOD``, ``TPU-V6E``."""
    slices: int = Field(default=1, gt=0)
    """TPU slices, joined by data parallelism over the data-centre network (the mesh's
    ``slice`` axis)."""
    max_restarts: int = Field(default=2, ge=0)
    """Times the worker group is restarted from the last checkpoint after a worker fails."""

    @model_validator(mode="after")
    def _check(self) -> PlacementConfig:
        tpu_fields = (self.topology, self.accelerator_type)
        if self.platform == "tpu" and None in tpu_fields:
            raise ValueError(
                "platform tpu needs topology and accelerator_type (e.g. 2x2x4, TPU-V4)"
            )
        if self.platform != "tpu" and (tpu_fields != (None, None) or self.slices != 1):
            raise ValueError("topology, accelerator_type and slices are for platform tpu")
        return self

    def workers(self) -> int:
        """JAX processes: every host of every TPU slice, else ``hosts``."""
        return self._tpu_layout()[0] if self.platform == "tpu" else self.hosts

    def chips_per_worker(self) -> int:
        """Devices of one JAX process: a TPU host's chips, else ``devices_per_host``."""
        return (
            int(self._tpu_layout()[1]["TPU"]) if self.platform == "tpu" else self.devices_per_host
        )

    def _tpu_layout(self) -> tuple[int, dict[str, float]]:
        """Workers and each one's resources, from Ray's TPU tables (``ray.util.tpu``)."""
        from ray.util.tpu import get_tpu_worker_resources

        return get_tpu_worker_resources(
            self.topology, self.accelerator_type, num_slices=self.slices
        )


class TrainConfig(StageConfig):
    """Train a GPT-J / NeoX model on the tokenize stage's rows."""

    volatile_fields = frozenset({"peak_flops_per_device", "log_every", "compilation_cache"})

    model: str = "gptj-tiny"
    """Model preset name (``stages.train.model_config.PRESETS``)."""
    model_overrides: dict[str, Any] = {}
    """Preset fields replaced, e.g. ``{remat: full, n_layers: 2}``."""
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Compute dtype; parameters and optimiser state are always float32."""
    mesh: MeshConfig = MeshConfig()
    """Device mesh over all hosts' devices."""
    placement: PlacementConfig = PlacementConfig()
    """How many training workers, where, with which devices."""
    global_batch: int = Field(gt=0)
    """Sequences per optimiser step, over all hosts and micro-batches."""
    micro_batches: int = Field(default=1, gt=0)
    """Gradient-accumulation micro-batches per step (GPT-J 6B: 16)."""
    steps: int = Field(gt=0)
    """Optimiser steps to train for (the run ends here; the schedule has its own length)."""
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig())
    """Recipe and schedule."""
    z_loss: float = Field(default=0.0, ge=0)
    """Weight of PaLM's z-loss ``mean(logsumexp(logits)^2)``; 0 turns it off."""
    val_every: int = Field(default=500, gt=0)
    """Steps between validation losses (and one at the end)."""
    val_batches: int = Field(default=100, gt=0)
    """Validation batches of ``global_batch / micro_batches`` rows each."""
    checkpoint_every: int = Field(default=500, gt=0)
    """Steps between checkpoints (and one at the end)."""
    keep: int = Field(default=3, gt=0)
    """Most recent checkpoints kept."""
    keep_every: int | None = Field(default=None, gt=0)
    """Checkpoints at multiples of this step are kept for good (GPT-J 6B: 10000)."""
    seed: int = 0
    """Seed of the parameter init and of the data order."""
    init_from: str | None = None
    """A train stage output (or its ``checkpoints`` dir) whose latest params start this run."""
    init_optimizer: bool = False
    """Carry the optimiser state and step count of ``init_from`` too (else fresh)."""
    peak_flops_per_device: float | None = Field(default=None, gt=0)
    """Peak FLOP/s of one device for MFU; unset: the accelerator's dense bf16 peak from
    ``stages/train/mfu.py``'s table, or on CPU a float32 matmul measured on each host."""
    log_every: int = Field(default=1, gt=0)
    """Steps between metric records sent to MLflow (each one batch of scalars)."""
    compilation_cache: str | None = None
    """JAX persistent compilation cache directory for this stage alone; None: the pipeline's
    ``compilation_cache``. Restarted or resumed hosts load their compiled steps from it."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.global_batch % self.micro_batches:
            raise ValueError(
                f"global_batch {self.global_batch} is not a multiple of micro_batches "
                f"{self.micro_batches}"
            )
        return self


def training_model_config(config: TrainConfig, vocab_size: int) -> ModelConfig:
    """The preset with overrides, the run's compute dtype and float32 master params, checked
    against the tokenizer's ``vocab_size``."""
    model = preset(
        config.model, **{**config.model_overrides, "dtype": config.dtype, "param_dtype": "float32"}
    )
    if model.vocab_size < vocab_size:
        raise ValueError(
            f"model {config.model} has {model.vocab_size} embeddings, the tokenizer "
            f"{vocab_size} ids"
        )
    return model
