"""qtool's inference runtime: weights in their quantized form, model code, backends, generation.

Contract: ``loader.load_model_weights`` turns a checkpoint into ``weights.ModelWeights`` (every linear kept in its
on-disk quantized form, q|k|v and gate|up fused by ``fusion``); the model code (``model``, ``families``) runs it
on a backend (``backends``) with the numerics of docs/numerics.md (``qtool.formats``). Importing this package
imports nothing heavy.
"""
