"""Training: the one loop (`loop`: fit), its evaluations (`evaluate`), where it runs (`sessions`: local, Tune
trial, Ray task, Ray Train worker) and how a run is launched (`launchers`: the Ray side), a step's pieces
(`step`), the checkpoint format and a run's checkpoint folders (`checkpoint`), optimizers and the poly schedule
(`optim`), the per-run heartbeat (`progress`) and phase timing marks (`timing`). Ray is imported only in
`sessions` and `launchers`.
"""
