"""Storage: the storage plan (`layout`: where sweeps, runs and pipelines live, what a name refers to, sweep.json)
and the driver lock of a sweep, run or pipeline folder (`lock`).
"""
