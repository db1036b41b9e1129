"""Datasets: sources and shard planning, reading, tokenizing (the tokenizer stage and encoders), packing, mixing, streaming; the prepare_dataset stage."""
