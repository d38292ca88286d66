"""Memory and speed of the streaming checkpoint export, against what people would use instead.

``python benchmarks/convert.py [--dir DIR] [--d-model 2048] [--layers 10] [--d-ff 8192]
[--vocab 50400] [--keep]``

1. Builds a float32 GPT-J checkpoint of random weights (>= 2 GB with the defaults: 710M
   parameters, 2.84 GB; Orbax's zstd takes ~7% off random weights on disk) in the train
   stage's layout (step 0 and the model config, written by
   ``stages.train.output.write_checkpoint``: Orbax ``StandardSave`` of ``{"params": ...}`` in
   the train stage's zarr chunks of at most 16 MiB (``output.chunked_save``), the params-only
   form that ``train.init_from`` reads). The weights are generated leaf by leaf in place in
   one numpy tree, in a subprocess, so no second copy of the model exists while it is written.
2. ``shutil.copytree`` of the checkpoint step directory: the plain file copy of the bytes an
   export has to read (MB/s).
3. Our streaming export (``export_train_output``: the checkpoint leaf being written and the
   next one read ahead, safetensors written as each tensor arrives) in a fresh subprocess:
   seconds, MB/s, peak RSS (``ru_maxrss``) and the RSS the interpreter had with every import
   done (JAX, Orbax, transformers for ``config.json``) before the clock starts.
4. The whole-model way (mesh-transformer-jax's exporter, and ours before streaming): restore
   every param at once, then write (``load_checkpoint_params`` + ``export_hf``), also in a
   fresh subprocess.

It prints peak RSS against the checkpoint size, the largest checkpoint leaf (all layers of
one weight; the streaming export holds two) and the largest Hugging Face tensor, and MB/s
against the copy. Goals (issue 7): peak RSS <= 2x the largest tensor + 1 GB; throughput >= 50%
of the copy. Everything is written under ``--dir`` and deleted at the end (unless ``--keep``).
The machine is shared: the load average is printed with the figures, which move between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

GB = 1024**3


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _model(args: argparse.Namespace) -> Any:
    from stages.train.model_config import gptj

    heads = args.d_model // 128
    return gptj(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=heads,
        d_ff=args.d_ff,
        rotary_dim=64,
    )


def build(args: argparse.Namespace) -> dict[str, Any]:
    """The random checkpoint at ``{dir}/train``; its leaf sizes."""
    import numpy as np

    from stages.train.output import write_checkpoint
    from stages.train.params import expected_shapes

    config = _model(args)
    rng = np.random.default_rng(0)
    params: dict[str, Any] = {}
    sizes = {}
    for path, shape in expected_shapes(config).items():
        leaf = rng.standard_normal(shape, dtype=np.float32)
        leaf *= 0.02
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
        sizes["/".join(path)] = leaf.nbytes
    write_checkpoint(params, config, os.path.join(args.dir, "train"))
    return {"leaf_bytes": sizes, "build_peak_rss": _peak_rss()}


def export(args: argparse.Namespace) -> dict[str, Any]:
    """One export of ``{dir}/train`` to ``{dir}/{mode}``, streaming or whole-model."""
    # config.json's writer (lazily loaded submodules too), imported before the clock starts.
    from transformers import AutoConfig, GenerationConfig  # noqa: F401

    from stages.convert import export_hf, export_train_output
    from stages.train.output import load_checkpoint_params, read_model_config

    train, dest = os.path.join(args.dir, "train"), os.path.join(args.dir, args.mode)
    ready_rss = _peak_rss()
    began = time.perf_counter()
    if args.mode == "streaming":
        export_train_output(train, dest)
    else:
        export_hf(load_checkpoint_params(train), read_model_config(train), dest)
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "ready_rss": ready_rss, "peak_rss": _peak_rss()}


def _child(args: argparse.Namespace, step: str, mode: str = "") -> dict[str, Any]:
    argv = [sys.executable, os.path.abspath(__file__), "--dir", args.dir, "--step", step]
    argv += ["--mode", mode] if mode else []
    argv += ["--d-model", str(args.d_model), "--layers", str(args.layers)]
    argv += ["--d-ff", str(args.d_ff), "--vocab", str(args.vocab)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=_repo())
    if done.returncode:
        raise RuntimeError(f"{step} {mode} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _repo() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dir_bytes(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def _largest_hf_tensor(args: argparse.Namespace) -> int:
    import numpy as np

    from stages.convert import hf_tensor_shapes

    return max(int(np.prod(shape)) * 4 for _, shape in hf_tensor_shapes(_model(args)))


def _copy(args: argparse.Namespace) -> float:
    source = os.path.join(args.dir, "train", "checkpoints", "0")
    dest = os.path.join(args.dir, "copy")
    began = time.perf_counter()
    shutil.copytree(source, dest)
    seconds = time.perf_counter() - began
    shutil.rmtree(dest)
    return seconds


def _report(args: argparse.Namespace, built: dict[str, Any], runs: dict[str, Any]) -> None:
    checkpoint = _dir_bytes(os.path.join(args.dir, "train", "checkpoints", "0"))
    params = sum(built["leaf_bytes"].values())
    leaf_name, leaf = max(built["leaf_bytes"].items(), key=lambda item: item[1])
    hf_tensor = _largest_hf_tensor(args)
    copy_mb_s = checkpoint / 1e6 / runs["copy"]
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"checkpoint: {checkpoint / 1e9:.2f} GB on disk, params {params / 1e9:.2f} GB float32")
    print(f"largest checkpoint leaf {leaf_name}: {leaf / GB:.3f} GiB")
    print(f"largest Hugging Face tensor: {hf_tensor / GB:.3f} GiB")
    print(f"copytree of the checkpoint: {runs['copy']:.1f}s, {copy_mb_s:.0f} MB/s")
    print(
        f"{'export':<12}{'seconds':>9}{'MB/s':>8}{'vs copy':>9}{'peak RSS':>10}"
        f"{'ready RSS':>11}{'peak/ckpt':>11}{'peak/leaf':>11}{'goal':>8}"
    )
    goal = 2 * leaf + GB
    for mode in ("streaming", "whole-model"):
        run = runs[mode]
        mb_s = params / 1e6 / run["seconds"]
        print(
            f"{mode:<12}{run['seconds']:>9.1f}{mb_s:>8.0f}{mb_s / copy_mb_s:>8.0%} "
            f"{run['peak_rss'] / GB:>8.2f}G{run['ready_rss'] / GB:>10.2f}G"
            f"{run['peak_rss'] / checkpoint:>11.2f}{run['peak_rss'] / leaf:>11.2f}"
            f"{'ok' if run['peak_rss'] <= goal else 'over':>8}"
        )
    print(f"memory goal: peak RSS <= 2 x largest leaf + 1 GiB = {goal / GB:.2f} GiB")
    print(f"streaming peak RSS above the ready RSS: {_above(runs['streaming']) / GB:.2f} GiB")


def _above(run: dict[str, Any]) -> int:
    return int(run["peak_rss"] - run["ready_rss"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="scratch directory (default: a new temp)")
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--d-ff", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=50400)
    parser.add_argument("--keep", action="store_true", help="keep the files")
    parser.add_argument("--step", choices=["build", "export"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["streaming", "whole-model"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step == "build":
        print(json.dumps(build(args)))
        return
    if args.step == "export":
        print(json.dumps(export(args)))
        return
    scratch = args.dir is None
    args.dir = args.dir or tempfile.mkdtemp(prefix="meshline-convert-bench-")
    try:
        built = _child(args, "build")
        # Each measurement starts with no dirty pages left by the one before, so none of them
        # is throttled for writing back another's bytes.
        os.sync()
        runs: dict[str, Any] = {"copy": _copy(args)}
        for mode in ("streaming", "whole-model"):
            os.sync()
            runs[mode] = _child(args, "export", mode)
            shutil.rmtree(os.path.join(args.dir, mode))
        _report(args, built, runs)
    finally:
        if not args.keep:
            shutil.rmtree(os.path.join(args.dir, "train"), ignore_errors=True)
            if scratch:
                shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
