"""Training: configs and presets, tasks (what a run trains on), lr schedules, the one loop,
checkpoints and the trained-model cache.

Submodules are imported lazily by their users so that ``import capsbench.train`` stays cheap.
"""
