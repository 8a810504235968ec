"""Files: an output folder written and read (folder.py), rounded weights in
compressed-tensors (compressed.py), config.json and the standalone modeling file (hf.py,
modeling.py), exports (exports.py), models loaded from folders and GGUF files
(loading.py), the one atomic writer (atomic.py), the user's cache (cache.py)."""
