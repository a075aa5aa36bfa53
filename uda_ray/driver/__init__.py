"""The driver side of each API call (uda_ray.api is the public surface over it).

`prepare`  an experiment made ready to run: references resolved, validated, data resolved (the one path
           every run, sweep, pipeline stage and rerun takes); the Ray address of a call
`sweeps`   the sweep lifecycle: start, resume, the sweep folder, warm start, status, `ls`
`queries`  what a sweep's results tables say: best trials, the Pareto front, the leaderboard, export
`runs`     single runs, pipelines and seed reruns

Each call is split in two: a plan made without side effects (everything a user can get wrong is found
there, before anything is written), then its execution, which uda_ray.api runs inside the call's Ray
connection. Nothing here imports Ray: uda_ray.api owns the connection.
"""
