"""Our model as an lm-evaluation-harness ``LM``: ``--model meshline``.

Importing this module registers ``meshline``, so any harness task runs on a meshline
checkpoint::

    import stages.evaluate.lm_eval_model  # noqa: F401
    lm_eval.simple_evaluate(model="meshline", model_args="checkpoint=DIR,tokenizer=TOK", ...)

``checkpoint`` is a train stage output (then ``tokenizer`` is the tokenize stage output or
its ``tokenizer/`` directory, and ``step`` picks a checkpoint, the latest by default) or a
Hugging Face export from the convert stage (its tokenizer files are in it). Scoring is
``JaxLM``'s; ``generate_until`` decodes greedily with ``stages.train.generate``.
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  (the harness loads its own models only into an empty registry)
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from pipeline import storage
from stages.convert.hf_dir import CONFIG
from stages.evaluate.lm import JaxLM
from stages.evaluate.shapes import run_shapes
from stages.tokenize.tokenizer import load_tokenizer
from stages.train.compile_cache import USER_CACHE, use_compilation_cache
from stages.train.generate import generate, padded_width

DEFAULT_MAX_GEN_TOKS = 256


def load_lm(
    checkpoint: str,
    tokenizer: str | None = None,
    step: int | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
) -> JaxLM:
    """A ``JaxLM`` from a train stage output (with ``tokenizer``) or a Hugging Face export."""
    if storage.exists(storage.join(checkpoint, CONFIG)):
        return JaxLM.from_hf_dir(checkpoint, batch_size=batch_size, max_length=max_length)
    if tokenizer is None:
        raise ValueError(f"{checkpoint}: a train output needs tokenizer= (a tokenize output)")
    return JaxLM.from_train_output(
        checkpoint, load_tokenizer(tokenizer), step, batch_size=batch_size, max_length=max_length
    )


@register_model("meshline")
class MeshlineLM(LM):
    """lm-eval's view of a ``JaxLM``."""

    def __init__(
        self,
        checkpoint: str,
        tokenizer: str | None = None,
        step: int | None = None,
        batch_size: int | str = 32,
        max_length: int | None = None,
        compilation_cache: str = USER_CACHE,
        **_harness_options: object,
    ):
        """``compilation_cache``: where compiled programs are kept between runs ("" or
        "none": not kept). ``_harness_options`` takes what the harness passes every model
        (device, max_batch_size): JAX places the model itself."""
        super().__init__()
        use_compilation_cache(
            None if str(compilation_cache).lower() == "none" else compilation_cache
        )
        size = 32 if batch_size == "auto" else int(batch_size)
        self.lm = load_lm(
            checkpoint,
            tokenizer,
            None if step is None else int(step),
            size,
            None if max_length is None else int(max_length),
        )

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        return self.lm.loglikelihood([tuple(r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        return self.lm.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy continuations, cut at the first of ``until`` (default: EOS text). Prompts
        with the same options decode together, longest first, ``batch_size`` at a time: a
        few compiled loops and batched steps instead of one of each per prompt (a chunk
        whose shape would not pay for its compile runs padded to one already compiled)."""
        by_options: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for index, request in enumerate(requests):
            by_options.setdefault(self._options(request.args[1]), []).append(index)
        texts: list[str] = [""] * len(requests)
        lm = self.lm
        for (until, new_tokens), indices in by_options.items():
            prompts = {i: self._prompt(requests[i].args[0], new_tokens) for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            chunks = [order[s : s + lm.batch_size] for s in range(0, len(order), lm.batch_size)]
            room = lm.config.max_len - new_tokens
            own = [(len(c), padded_width(max(len(prompts[i]) for i in c), room)) for c in chunks]
            shapes = run_shapes(own, lambda shape, n=new_tokens: shape[0] * (shape[1] + n))
            for chunk, (rows, width) in zip(chunks, shapes, strict=True):
                batch = [prompts[i] for i in chunk]
                # Filler rows repeat the last prompt, so they finish when it does.
                batch += batch[-1:] * (rows - len(batch))
                ids = generate(
                    lm.config,
                    lm.params,
                    batch,
                    new_tokens,
                    eos_id=lm.tokenizer.eos_id,
                    pad_id=0,
                    width=width,
                )
                for i, row in zip(chunk, ids, strict=False):
                    texts[i] = self._text(row.tolist(), until)
        return texts

    def _options(self, options: dict) -> tuple[tuple[str, ...], int]:
        """The stop strings and the number of new tokens a request asks for."""
        lm = self.lm
        until = options.get("until") or [lm.tokenizer.decode([lm.tokenizer.eos_id])]
        until = [until] if isinstance(until, str) else list(until)
        new_tokens = int(options.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        return tuple(until), min(new_tokens, lm.max_length - 1)

    def _prompt(self, context: str, new_tokens: int) -> list[int]:
        """The context's last tokens that leave room for ``new_tokens``."""
        lm = self.lm
        return (lm.encode(context) or [lm.prefix_token])[-(lm.max_length - new_tokens) :]

    def _text(self, ids: list[int], until: tuple[str, ...]) -> str:
        """The decoded continuation up to its first EOS, cut at the first stop string."""
        eos = self.lm.tokenizer.eos_id
        text = self.lm.tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids)
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text
