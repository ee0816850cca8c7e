"""Training: configs and presets, the loop, checkpoints and the trained-model cache.

Submodules are imported lazily by their users so that ``import capsbench.train`` stays cheap.
"""
