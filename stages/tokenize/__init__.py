"""The tokenize stage: BPE-encode dedup's documents and pack them into Arrow shards.

Input (dedup's contract): ``{dedup}/{split}/part-NNNNN.parquet`` with ``text``,
``pile_set_name`` and ``doc_id`` string columns, rows in a deterministic order.

Output contract (``{out}`` is the stage output directory; train and evaluate read it):

- ``{out}/{split}/shard-NNNNN.arrow``: Arrow IPC files (uncompressed, so they memory-map)
  with one column ``tokens: FixedSizeList<uint16>[seq_len + 1]`` (``uint32`` when the
  vocabulary has more than 65536 ids). Shard ``NNNNN`` is made from the split's
  ``NNNNN``-th dedup part in name order. Packing follows GPT-J: each document is encoded,
  followed by EOS (no BOS), the split's documents are concatenated in order and cut into
  rows of ``seq_len + 1`` ids (inputs ``row[:-1]``, targets ``row[1:]``). Remainder rule:
  the ids left over at the end of a part are carried into the next part's first row, and
  the split's final leftover (fewer than ``seq_len + 1`` ids) is dropped and counted. The
  rows are therefore the same whatever the number of workers or restarts.
- With a ``mixture`` each component is its own stream, packed the same way:
  ``{out}/{split}/{component-dir}/shard-NNNNN.arrow`` (``Gutenberg (PG-19)`` ->
  ``gutenberg-pg-19``), so a loader can sample components by their weights.
- ``{out}/{split}[/{component-dir}]/carry-NNNNN.bin``: the ids carried out of part ``NNNNN``
  (raw little-endian ``dtype``); what a restart resumes the next part with. Not training data.
- ``{out}/manifest.json``: ``format``, ``seq_len``, ``row_len``, ``dtype``, ``eos_id``,
  ``packing`` (the rule above in words), ``tokenizer`` (kind, fingerprint, vocab_size,
  path), ``splits.{split}`` (``rows``, ``documents``, ``tokens`` encoded including EOS,
  ``tokens_dropped``, ``components.{pile_set_name}.{documents,tokens}``, and ``shards`` as
  ``{path, rows, first_row, source}`` in order; with a mixture the shards, ``rows``,
  ``tokens_dropped`` and ``directory`` are per component instead) and ``mixture`` (per
  component: ``epochs``, ``weight`` = its share of an epoch-weighted pass over train).
- ``{out}/tokenizer/``: ``tokenizer.json``, ``tokenizer_config.json`` and
  ``special_tokens_map.json`` (``transformers.AutoTokenizer.from_pretrained`` and
  ``tokenizers.Tokenizer.from_file`` load them), ``meshline_tokenizer.json`` (which engine
  and special tokens), and for GPT-2 the tiktoken ranks ``gpt2.tiktoken``.
  ``load_tokenizer(out)`` returns the exact tokenizer the data was made with. Special-token
  strings inside documents were encoded as text: ``tokenizer_config.json`` sets
  ``split_special_tokens`` for ``AutoTokenizer``; a bare ``tokenizers.Tokenizer`` needs
  ``encode_special_tokens = True`` for the same ids.
- Reading: ``ShardDataset.from_output(out, split[, component])`` memory-maps the shards
  and indexes any global row without copying.

Where things live:

- ``config``: ``TokenizeConfig`` and the tokenizer specs (GPT-2's, or a trained BPE), the
  Pile's component epochs, component directory names.
- ``tokenizer``: ``Tokenizer`` (its files and the engine that reads them, chunked encoding),
  ``load_tokenizer`` and the saved files' names.
- ``hf_files``: the Hugging Face ``tokenizer.json`` made from tiktoken ranks, the
  ``AutoTokenizer`` side files, meshline's descriptor.
- ``bpe``: making a tokenizer (``load_gpt2`` from ranks or a ``tokenizer.json``,
  ``train_bpe``); the names other stages import for tokenizers.
- ``parts``: dedup's parts planned, the training sample, one part's unit (rows, carries).
- ``encoding``: the Ray Data pool of ``Encoder`` actors and the encoded batches in order.
- ``packing``: rows of ``seq_len + 1`` ids and the Arrow IPC writer.
- ``manifest``: ``manifest.json`` written as the last unit and read back (``read_manifest``).
- ``reader``: ``ShardDataset``, memory-mapped rows (no Ray needed).
- ``stage``: the registered stage: tokenizer unit, part units in order, manifest, metrics.
"""

from stages.tokenize.config import TokenizeConfig
from stages.tokenize.manifest import read_manifest
from stages.tokenize.reader import ShardDataset
from stages.tokenize.stage import run
from stages.tokenize.tokenizer import Tokenizer, load_tokenizer

__all__ = ["ShardDataset", "TokenizeConfig", "Tokenizer", "load_tokenizer", "read_manifest", "run"]
