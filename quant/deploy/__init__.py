"""Exports of plmq-quantized models to formats other runtimes load (see quant.deploy.compressed_tensors)."""
