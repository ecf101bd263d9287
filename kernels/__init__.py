"""Numerics of the pipeline: NF4, 4-bit linear, LoRA, optimizers, GPTQ, K-quants.

Each kernel has a pure-torch reference; Triton twins sit beside them and are used on CUDA.
Nothing here does file or network I/O except the explicit (de)serialisation helpers.
"""
