"""The data path: block shards (``shards``), the global sentence order (``order``), the shard reader with exact
resume on any topology (``reader``), packing whole sentences into rows (``packing``, ``packed_stream``), MLM
masking (``masking``), tokenizer files (``tokenizer_files``) and the task files of the benchmarks (``tasks``)."""
