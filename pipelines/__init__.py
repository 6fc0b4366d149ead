"""plmq pipelines: stages (finetune, evaluate, ...), data and model loading, the driver, the CLI."""
