"""Hugging Face model directories (GPT-J or GPT-NeoX): written from a stream of tensors,
read back lazily.

The writer makes what ``AutoModelForCausalLM.from_pretrained(dir)`` loads as it is:
``model-0000X-of-0000N.safetensors`` shards of at most ``max_shard_bytes`` (a larger single
tensor gets a shard of its own) with ``model.safetensors.index.json``,
``generation_config.json``, the tokenize stage's tokenizer files if given, and
``config.json`` (every field set, ``tie_word_embeddings: false``) last. Every tensor's name
and shape are known from the model config before any weight is read
(``layout.hf_tensor_shapes``), so each shard's safetensors header is written first and each
tensor is cast and written as it arrives: a matrix that needs a copy (transposed or cast) is
copied and written a band of rows at a time, so nothing is buffered but one band of the tensor
at hand.

Files go through an ``Opener`` (name -> writable stream), so the same writer fills a local
directory (built in a hidden sibling and renamed into place), a ``gs://`` prefix (each object
appears whole; ``config.json`` is written last and the prefix is deleted if the export
fails) or a ledger unit.

The reader opens each safetensors tensor only when asked for it. Pickled ``.bin`` weights are
refused unless the caller says it trusts them (``torch.load`` can run arbitrary code). A
``gs://`` directory is copied to local disk first, one file at a time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import IO, Any, TypedDict, Unpack

import numpy as np
from safetensors import safe_open

from pipeline import storage
from pipeline.progress import PhaseBar
from stages.convert.config import DEFAULT_MAX_SHARD_BYTES
from stages.convert.layout import SAFETENSORS_DTYPES, ConvertError, check_dtype, hf_tensor_shapes
from stages.train.hf_mapping import config_from_hf, hf_config, iter_hf_tensors, params_from_hf
from stages.train.model_config import ModelConfig
from stages.train.params import Params, Shape, check_params

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONFIG = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_DTYPE = "float32"
TRANSPOSE_BLOCK = 256

Opener = Callable[[str], AbstractContextManager[IO[bytes]]]
"""Opens the named file of the model directory for writing; it is kept when closed cleanly."""
Tensors = Iterator[tuple[str, np.ndarray]]


class HfOptions(TypedDict, total=False):
    """What ``write_hf`` takes besides the model and its tensors (see there), passed on by
    ``export_hf`` and ``checkpoint.export_checkpoint``."""

    dtype: str
    max_shard_bytes: int
    tokenizer_dir: str | None
    bos_token_id: int | None
    eos_token_id: int | None


@dataclass(frozen=True)
class ExportSummary:
    """What an export wrote."""

    tensors: int
    shards: int
    bytes: int
    """Bytes of tensor data (the index's ``total_size``)."""
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)

    def line(self) -> str:
        return (
            f"{self.tensors} tensors in {self.shards} shards, {self.bytes / 1e6:.1f} MB "
            f"in {self.seconds:.1f}s ({self.mb_per_s:.0f} MB/s)"
        )


def _write_tensor(f: IO[bytes], tensor: np.ndarray, dtype: np.dtype) -> int:
    """Write ``tensor`` C-ordered as ``dtype``, cast through float32 first so bf16 master weights
    and float32 ones round the same way; returns the bytes written. Copied only where dtype or
    order change, and a matrix a band of rows at a time, so no whole copy is ever held."""
    source = np.asarray(tensor, np.float32)
    if source.ndim != 2 or (source.flags.c_contiguous and source.dtype == dtype):
        data = source.astype(dtype, order="C", copy=False)
        f.write(memoryview(data.reshape(-1).view(np.uint8)))
        return data.nbytes
    # Copied in square blocks, since one strided pass over a transposed matrix (every torch
    # Linear weight) misses the cache on nearly every element (2x slower). Each band is
    # written by this thread while it is still in this core's cache: handing it to a writer
    # thread to overlap the copy with the write was 3x slower (205 vs 702 MB/s for a 2048 x
    # 8192 float32 transpose written to local disk on 2 cores).
    rows, cols = source.shape
    buffer = np.empty((min(TRANSPOSE_BLOCK, rows), cols), dtype)
    for i in range(0, rows, TRANSPOSE_BLOCK):
        band = buffer[: min(TRANSPOSE_BLOCK, rows - i)]
        for j in range(0, cols, TRANSPOSE_BLOCK):
            columns = slice(j, j + TRANSPOSE_BLOCK)
            band[:, columns] = source[i : i + TRANSPOSE_BLOCK, columns]
        f.write(memoryview(band.reshape(-1).view(np.uint8)))
    return rows * cols * dtype.itemsize


def plan_shards(
    tensors: list[tuple[str, Shape]], itemsize: int, max_shard_bytes: int
) -> list[list[tuple[str, Shape]]]:
    """Consecutive tensors grouped into shards of at most ``max_shard_bytes``."""
    shards: list[list[tuple[str, Shape]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _header(shard: list[tuple[str, Shape]], dtype: str, itemsize: int) -> bytes:
    """The safetensors header (length prefix included) of tensors stored in ``shard`` order."""
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shard:
        end = offset + int(np.prod(shape)) * itemsize
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data then starts 8-byte aligned, as safetensors pads
    return struct.pack("<Q", len(text)) + text


def _write_shard(
    f: IO[bytes],
    shard: list[tuple[str, Shape]],
    tensors: Tensors,
    dtype: str,
    bar: PhaseBar,
) -> int:
    np_dtype = check_dtype(dtype)
    f.write(_header(shard, SAFETENSORS_DTYPES[dtype], np_dtype.itemsize))
    written = 0
    for expected, shape in shard:
        name, tensor = next(tensors)
        if (name, tuple(tensor.shape)) != (expected, shape):
            raise ConvertError(
                f"tensor {name} {tuple(tensor.shape)} arrived where {expected} {shape} belongs"
            )
        written += _write_tensor(f, tensor, np_dtype)
        bar.update(1)
        # A view of a whole checkpoint leaf; let it go before the next is read.
        del tensor
    return written


def write_weights(
    planned: list[tuple[str, Shape]],
    tensors: Tensors,
    opener: Opener,
    dtype: str,
    max_shard_bytes: int,
) -> tuple[int, int]:
    """Shards and index from ``tensors``, which must come as ``planned`` (the model's
    ``hf_tensor_shapes``); returns (shard count, tensor bytes)."""
    if max_shard_bytes <= 0:
        raise ConvertError(f"max_shard_bytes {max_shard_bytes} must be positive")
    shards = plan_shards(planned, check_dtype(dtype).itemsize, max_shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    with PhaseBar(len(planned), "tensors", "convert export") as bar:
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            with opener(name) as f:
                total += _write_shard(f, shard, tensors, dtype, bar)
            weight_map.update(dict.fromkeys((tensor for tensor, _ in shard), name))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(opener, INDEX, index)
    return len(shards), total


def _write_json(opener: Opener, name: str, data: Mapping[str, Any]) -> None:
    with opener(name) as f:
        f.write((json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def _hf_configs(
    config: ModelConfig, dtype: str, bos_token_id: int | None, eos_token_id: int | None
) -> tuple[str, str]:
    """The JSON texts of config.json and generation_config.json."""
    import transformers

    fields = hf_config(config)
    hf_conf = transformers.AutoConfig.for_model(
        fields.pop("model_type"),
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        dtype=dtype,
        **fields,
    )
    generation = transformers.GenerationConfig(
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id
    )
    return hf_conf.to_json_string(use_diff=False), generation.to_json_string(use_diff=True)


def _copy_tokenizer(tokenizer_dir: str, opener: Opener) -> None:
    present = [n for n in TOKENIZER_FILES if storage.exists(storage.join(tokenizer_dir, n))]
    if "tokenizer.json" not in present:
        raise ConvertError(f"{tokenizer_dir}: no tokenizer.json to export with the model")
    for name in present:
        with opener(name) as f:
            f.write(storage.read_bytes(storage.join(tokenizer_dir, name)))


def write_hf(
    config: ModelConfig,
    tensors: Tensors,
    opener: Opener,
    dtype: str = DEFAULT_DTYPE,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer_dir: str | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> ExportSummary:
    """Every file of the model directory through ``opener``, ``config.json`` last.

    ``bos_token_id`` defaults to ``eos_token_id`` (GPT-2's ``<|endoftext|>`` is both)."""
    began = time.perf_counter()
    check_dtype(dtype)
    planned = hf_tensor_shapes(config)
    shards, total = write_weights(planned, tensors, opener, dtype, max_shard_bytes)
    bos = eos_token_id if bos_token_id is None else bos_token_id
    config_json, generation_json = _hf_configs(config, dtype, bos, eos_token_id)
    with opener("generation_config.json") as f:
        f.write(generation_json.encode())
    if tokenizer_dir is not None:
        _copy_tokenizer(tokenizer_dir, opener)
    with opener(CONFIG) as f:
        f.write(config_json.encode())
    return ExportSummary(len(planned), shards, total, time.perf_counter() - began)


@contextmanager
def new_directory(dest: str) -> Iterator[Opener]:
    """An ``Opener`` into ``dest``, which must not exist, and which holds a finished model
    directory only if the block succeeds (see the module docstring)."""
    if storage.is_gcs(dest):
        if storage.list_files(dest):
            raise FileExistsError(f"{dest} exists; export writes a new directory")
        try:
            yield lambda name: storage.writer(storage.join(dest, name))
        except BaseException:
            storage.delete(dest, recursive=True)
            raise
        return
    with storage.new_local_directory(dest, "export") as tmp:
        # The caller's with-block closes each file.
        yield lambda name: open(os.path.join(tmp, name), "wb")  # noqa: SIM115


def export_hf(params: Params, config: ModelConfig, dest: str, **options: Unpack[HfOptions]) -> str:
    """Write ``params`` (an unboxed tree in memory) as a new model directory ``dest``
    (local or ``gs://``) with ``write_hf``'s ``options``; returns ``dest``.
    ``export_checkpoint`` streams from a checkpoint."""
    check_dtype(options.get("dtype", DEFAULT_DTYPE))
    check_params(config, params, "params")
    with new_directory(dest) as opener:
        summary = write_hf(config, iter_hf_tensors(config, params), opener, **options)
    log.info("exported %s: %s", dest, summary.line())
    return dest if storage.is_gcs(dest) else os.path.abspath(storage.local_path(dest))


class _LazyTensors(Mapping[str, np.ndarray]):
    """Tensor name -> array, read from its safetensors file only when asked for."""

    def __init__(self, src: str, files: list[str], bar: PhaseBar | None = None):
        self._src = src
        self._bar = bar
        self._file_of: dict[str, str] = {}
        for name in files:
            path = os.path.join(src, name)
            try:
                with safe_open(path, framework="numpy") as f:
                    self._file_of.update(dict.fromkeys(f.keys(), path))
            except Exception as exc:
                raise ConvertError(f"{path}: not a readable safetensors file ({exc})") from None

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._file_of:
            raise ConvertError(f"{self._src}: tensor {name} is missing")
        path = self._file_of[name]
        try:
            with safe_open(path, framework="numpy") as f:
                tensor = f.get_tensor(name)
        except Exception as exc:
            raise ConvertError(f"{path}: cannot read tensor {name} ({exc})") from None
        if self._bar is not None:
            self._bar.update(1)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def _weight_files(src: str, trust_pickle: bool) -> tuple[list[str], bool]:
    """The weight files of ``src`` and whether they are pickles."""
    index = os.path.join(src, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values())), False
    if os.path.exists(os.path.join(src, SINGLE)):
        return [SINGLE], False
    pickles = sorted(n for n in os.listdir(src) if n.endswith(".bin"))
    if not pickles:
        raise ConvertError(f"{src}: no {INDEX}, {SINGLE} or .bin weights")
    if not trust_pickle:
        raise ConvertError(
            f"{os.path.join(src, pickles[0])}: pickled weights can run code when loaded; "
            "convert them to safetensors or pass trust_pickle=True if you trust the file"
        )
    return pickles, True


def _pickled_tensors(src: str, files: list[str]) -> dict[str, np.ndarray]:
    import torch

    state: dict[str, np.ndarray] = {}
    for name in files:
        # weights_only even when trusted: a state dict needs nothing more, and it is safer.
        loaded = torch.load(os.path.join(src, name), map_location="cpu", weights_only=True)
        # numpy has no bfloat16 for torch to hand over, so pickled weights come as float32.
        state.update({k: v.float().numpy() for k, v in loaded.items()})
    return state


def read_hf_config(src: str) -> ModelConfig:
    """Our config from ``{src}/config.json`` (GPT-J or GPT-NeoX), errors naming the file."""
    path = storage.join(src, CONFIG)
    try:
        return config_from_hf(json.loads(storage.read_text(path)))
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing; not a Hugging Face model directory") from None
    except (OSError, ValueError, KeyError) as exc:
        raise ConvertError(f"{path}: {exc}") from None


def _import_local(src: str, trust_pickle: bool) -> tuple[Params, ModelConfig]:
    config = read_hf_config(src)
    files, pickled = _weight_files(src, trust_pickle)
    if pickled:
        params = params_from_hf(config, _pickled_tensors(src, files))
    else:
        with PhaseBar(None, "tensors", "convert import") as bar:
            state = _LazyTensors(src, files, bar)
            bar.set_total(len(state))
            params = params_from_hf(config, state)
    check_params(config, params, src)
    return params, config


def _download(src: str, local: str) -> None:
    """Copy the files of the ``gs://`` directory ``src`` into ``local``, streaming each."""
    for uri in storage.list_files(src):
        path = os.path.join(local, uri[len(src.rstrip("/")) + 1 :])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with storage.open_file(uri, "rb") as remote, open(path, "wb") as f:
            shutil.copyfileobj(remote, f, 16 * 1024**2)


def import_hf(src: str, trust_pickle: bool = False) -> tuple[Params, ModelConfig]:
    """Our parameter tree and config from a Hugging Face directory (local or ``gs://``):
    numpy in the safetensors' dtype (float32 from trusted ``.bin`` pickles)."""
    if not storage.is_gcs(src):
        return _import_local(storage.local_path(src), trust_pickle)
    read_hf_config(src)
    with tempfile.TemporaryDirectory(prefix="meshline-import-") as local:
        _download(src, local)
        return _import_local(local, trust_pickle)
