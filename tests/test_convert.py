"""Export to and import from Hugging Face directories: transformers loads the export with the
logits of our model, the round trip is bit-exact, pickles and bad inputs are refused with
errors naming the file or tensor. (Checkpoints, the stage, the CLI and the registry:
test_convert_checkpoint.py.)"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

from stages.convert import INDEX, ConvertError, export_hf, import_hf
from stages.convert.hf_dir import TRANSPOSE_BLOCK
from stages.convert.layout import check_dtype
from stages.tokenize.bpe import train_bpe
from stages.train.generate import generate
from stages.train.model import forward, init_params
from stages.train.model_config import ModelConfig, gptj, neox

CONFIGS = {
    "gptj": gptj(vocab_size=211, d_model=48, n_layers=2, n_heads=4, d_ff=96, rotary_dim=6),
    "neox-sequential": neox(
        vocab_size=150, d_model=56, n_layers=2, n_heads=7, rotary_pct=0.5, parallel_residual=False
    ),
    "neox-parallel-no-bias": neox(
        vocab_size=100, d_model=32, n_layers=2, n_heads=4, rotary_pct=1.0, attn_bias=False
    ),
}
MAX_RELATIVE_ERROR = 1e-5


@cache
def random_params(config: ModelConfig, seed: int = 0) -> dict:
    """Every leaf random (norm scales around 1), so a swapped or transposed tensor shows."""
    shapes = nn.unbox(init_params(config, jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: rng.normal(
            1.0 if path[-1].key == "scale" else 0.0, 0.2, leaf.shape
        ).astype(np.float32),
        shapes,
    )


def hf_logits(directory: str, tokens: np.ndarray) -> np.ndarray:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager", dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        return model.eval()(torch.tensor(tokens)).logits.numpy()


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def same_tree(a: dict, b: dict) -> bool:
    same_structure = jax.tree.structure(a) == jax.tree.structure(b)
    return same_structure and jax.tree.all(jax.tree.map(np.array_equal, a, b))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_transformers_loads_the_export_with_our_logits(name: str, tmp_path: Path) -> None:
    config = CONFIGS[name]
    params = random_params(config)
    dest = export_hf(params, config, str(tmp_path / "hf"), max_shard_bytes=16_000)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 3, 11))
    ours = np.stack([np.asarray(forward(config, params, batch)) for batch in tokens])
    theirs = hf_logits(dest, tokens.reshape(6, 11)).reshape(ours.shape)
    assert relative_error(ours, theirs) <= MAX_RELATIVE_ERROR


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_import_of_export_is_bit_exact(name: str, tmp_path: Path) -> None:
    config = CONFIGS[name]
    params = random_params(config)
    back, back_config = import_hf(export_hf(params, config, str(tmp_path / "hf")))
    assert back_config == config
    assert same_tree(back, params)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matrices_spanning_several_copy_bands_export_exactly(dtype: str, tmp_path: Path) -> None:
    # The output matrix has vocab rows: three bands, the last one short, so the band buffer is
    # reused and cut short.
    vocab = 2 * TRANSPOSE_BLOCK + 37
    config = gptj(vocab_size=vocab, d_model=16, n_layers=1, n_heads=2, d_ff=32, rotary_dim=4)
    params = random_params(config)
    back, _ = import_hf(export_hf(params, config, str(tmp_path / "hf"), dtype=dtype))
    assert same_tree(back, jax.tree.map(lambda a: a.astype(check_dtype(dtype)), params))


def test_export_layout_shards_index_and_configs(tmp_path: Path) -> None:
    config = CONFIGS["gptj"]
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text('{"model": {}}')
    (tokenizer / "tokenizer_config.json").write_text("{}")
    dest = export_hf(
        random_params(config),
        config,
        str(tmp_path / "hf"),
        max_shard_bytes=40_000,
        tokenizer_dir=str(tokenizer),
        eos_token_id=210,
    )
    with open(os.path.join(dest, INDEX)) as f:
        index = json.load(f)
    shards = sorted(n for n in os.listdir(dest) if n.endswith(".safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    sizes = [os.path.getsize(os.path.join(dest, s)) for s in shards]
    largest_tensor = config.vocab_size * config.d_model * 4
    assert max(sizes) <= max(40_000, largest_tensor) + 4096
    with open(os.path.join(dest, "config.json")) as f:
        hf = json.load(f)
    assert hf["tie_word_embeddings"] is False
    assert (hf["bos_token_id"], hf["eos_token_id"], hf["rotary_dim"]) == (210, 210, 6)
    with open(os.path.join(dest, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == 210
    assert (Path(dest) / "tokenizer.json").read_text() == '{"model": {}}'
    assert not [n for n in os.listdir(tmp_path) if "partial" in n]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_export_loads_and_is_the_rounded_float32(dtype: str, tmp_path: Path) -> None:
    config = CONFIGS["neox-sequential"]
    params = random_params(config)
    dest = export_hf(params, config, str(tmp_path / "hf"), dtype=dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(dest)
    assert model.dtype == getattr(torch, dtype)
    back, _ = import_hf(dest)
    half = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float16)
    assert same_tree(back, jax.tree.map(lambda a: a.astype(half), params))


def test_pickled_weights_are_refused_unless_trusted(tmp_path: Path) -> None:
    config = CONFIGS["gptj"]
    params = random_params(config)
    dest = export_hf(params, config, str(tmp_path / "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(dest)
    for name in os.listdir(dest):
        if "safetensors" in name:
            os.remove(os.path.join(dest, name))
    torch.save(model.state_dict(), os.path.join(dest, "pytorch_model.bin"))
    with pytest.raises(ConvertError, match="pytorch_model.bin"):
        import_hf(dest)
    back, _ = import_hf(dest, trust_pickle=True)
    assert same_tree(back, params)


def test_wrongly_shaped_or_missing_params_are_named_and_leave_nothing(tmp_path: Path) -> None:
    config = CONFIGS["gptj"]
    params = random_params(config)
    bad = {**params, "ln_f": {**params["ln_f"], "scale": np.ones(3, np.float32)}}
    with pytest.raises(ConvertError, match="ln_f/scale has shape"):
        export_hf(bad, config, str(tmp_path / "hf"))
    missing = {**params, "lm_head": {"bias": params["lm_head"]["bias"]}}
    with pytest.raises(ConvertError, match="lm_head/kernel is missing"):
        export_hf(missing, config, str(tmp_path / "hf"))
    assert os.listdir(tmp_path) == []


def test_truncated_shard_and_missing_tensor_are_named(tmp_path: Path) -> None:
    config = CONFIGS["gptj"]
    dest = export_hf(random_params(config), config, str(tmp_path / "hf"), max_shard_bytes=16_000)
    with open(os.path.join(dest, INDEX)) as f:
        weight_map = json.load(f)["weight_map"]
    shard = os.path.join(dest, weight_map["lm_head.weight"])
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(ConvertError, match=os.path.basename(shard)):
        import_hf(dest)


def test_other_architecture_config_is_refused(tmp_path: Path) -> None:
    config = CONFIGS["gptj"]
    dest = export_hf(random_params(config), config, str(tmp_path / "hf"))
    path = os.path.join(dest, "config.json")
    with open(path) as f:
        hf = json.load(f)
    with open(path, "w") as f:
        json.dump({**hf, "model_type": "llama"}, f)
    with pytest.raises(ConvertError, match="config.json.*llama"):
        import_hf(dest)


def test_tokenizer_loads_and_greedy_generate_equals_ours(tmp_path: Path) -> None:
    texts = [f"the {w} of {n} is {n * 7} and more" for w in ("sum", "cube") for n in range(60)]
    tokenizer = train_bpe(texts, vocab_size=300)
    tokenizer.save(str(tmp_path / "tokenizer"))
    config = gptj(vocab_size=300, d_model=32, n_layers=2, n_heads=4, d_ff=64, rotary_dim=4)
    params = random_params(config)
    dest = export_hf(
        params,
        config,
        str(tmp_path / "hf"),
        tokenizer_dir=str(tmp_path / "tokenizer"),
        eos_token_id=tokenizer.eos_id,
    )
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(dest)
    prompt = "the cube of 12 is"
    ids = hf_tokenizer(prompt)["input_ids"]
    assert ids == list(tokenizer.encode(prompt))
    model = transformers.AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32)
    with torch.no_grad():
        theirs = model.generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False, min_new_tokens=12
        )[0, len(ids) :].tolist()
    ours = generate(config, params, [ids], max_new_tokens=12)[0].tolist()
    assert ours == theirs
