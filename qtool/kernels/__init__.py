"""qtool's CUDA kernels from Python: the NVRTC loader (loader.py), weight repacking for the kernels (weights.py)
and thin launch wrappers on torch tensors (ops.py). Importing this package imports neither torch nor cupy."""
