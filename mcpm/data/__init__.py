"""Data: documents from sources, tokenized, packed and batched by a grain pipeline.

- :mod:`mcpm.data.pipeline`: ``make_iterator(data_cfg, process_index=, process_count=)`` -> an
  iterator of packed numpy batches with ``get_state``/``set_state``/``stats``.
- :mod:`mcpm.data.sources`: the document sources (local txt/jsonl/parquet/ArrayRecord files,
  TFDS datasets in ArrayRecord format) and their bad-data handling.
- :mod:`mcpm.data.packing`: tokenizing and packing as grain transformations.
- :mod:`mcpm.data.builtin_tfds`: the built-in corpus (the Python standard library's sources) as a
  TFDS ArrayRecord dataset and its SentencePiece model, prepared once into the cache.
- :mod:`mcpm.data.builtin_corpus`: the standard-library files themselves.

Submodules are imported on use (grain and TFDS are slow to import).
"""
