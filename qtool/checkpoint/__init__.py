"""Reading checkpoints: file index (`files`), per-layer format (`scheme`), and what `inspect` shows.

Contract: `files.open_checkpoint` and `scheme.describe` read headers and JSON only (no torch);
they are shared by `qtool inspect` and the runtime loader. Heavy readers (`deep`) import
safetensors/torch inside their functions.
"""
