"""The network pieces of MBC, one file each: amortization, codebook, aggregation, prefix, KV-LoRA,
retrieval keys, decoding; and the backbones they sit on."""
