"""Ray actors: MREM's module trainers (imports only quant/ and the model-part code of pipelines/)."""

__all__ = ["fleet", "module_trainer", "predecessor_queue", "shard_reader"]
