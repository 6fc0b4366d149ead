"""Ray actors of plmq: thin classes that hold state and call quant/ and model code."""
