"""Training: the one loop (`loop`), a step's pieces (`step`), the checkpoint format, optimizers and the poly schedule,
the per-run heartbeat (`progress`) and phase timing marks.
"""
