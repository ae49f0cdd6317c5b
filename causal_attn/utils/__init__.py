"""Infrastructure every layer may use: the cache folder and file lock, the dependency-stack check, and where the
non-Python folders (kernels/, csrc/, benchmarks/) live."""
