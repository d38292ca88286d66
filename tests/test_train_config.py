"""configs/gptj-6b-pile.yaml's train section reproduces REFERENCE.md §3 (6B_roto_256)."""

from __future__ import annotations

from pathlib import Path

import yaml

from stages.train.config import TrainConfig
from stages.train.model_config import preset

ROOT = Path(__file__).resolve().parents[1]


def test_gptj_6b_pile_train_section_is_6b_roto_256() -> None:
    data = yaml.safe_load((ROOT / "configs" / "gptj-6b-pile.yaml").read_text())
    config = TrainConfig.model_validate(data["stages"]["train"])
    model = preset(config.model, **config.model_overrides)
    assert (model.n_layers, model.d_model, model.n_heads, model.rotary_dim) == (28, 4096, 16, 64)
    assert (model.vocab_size, model.max_len, config.dtype) == (50400, 2048, "bfloat16")
    # tpu_size 256 / cores_per_replica 8 = 32 replicas x per_replica_batch 1 x GAS 16.
    assert config.mesh.resolve(256) == (32, 1, 8)
    assert (config.global_batch, config.micro_batches) == (512, 16)
    assert config.placement.workers() * config.placement.chips_per_worker() * 2 == 256
    opt = config.optimizer
    assert (opt.lr, opt.end_lr, opt.warmup_steps, opt.anneal_steps) == (
        1.2e-4,
        1.2e-5,
        3000,
        300000,
    )
    assert (opt.weight_decay, opt.b1, opt.b2, opt.eps, opt.clip) == (0.1, 0.9, 0.999, 1e-8, 1.0)
    assert (config.steps, config.val_every, config.val_batches) == (350000, 500, 100)
    assert (config.checkpoint_every, config.keep_every, config.z_loss) == (500, 10000, 0.0)
