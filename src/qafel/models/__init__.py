"""The models as flat parameter vectors: ``networks`` (the modules, :class:`FlatModel`, ``build_module``),
``kernels`` (the fused GroupNorm/ReLU/max-pool and constant-input convolution kernels the networks use) and
``optimum`` (the convex problems' optimum, for suboptimality curves).

May import: ``qafel.errors`` only.
"""
