"""qtool: quantize (NVIDIA ModelOpt PTQ), inspect and run LLM checkpoints.

Importing this package is cheap: nothing heavy (torch, transformers, modelopt, cupy) is imported
at package level; commands import them inside their bodies.
"""
__version__ = "0.1.0"
