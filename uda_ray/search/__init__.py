"""Search: the search-space YAML (`space`) and Ray Tune with Optuna and ASHA: the tuner (`tune`), the Optuna
study (`study`), the searcher (`searcher`), the scheduler (`scheduler`), the results callback (`callbacks`), the
trial driver (`driver`), a trial's experiment (`experiments`), cluster start-up (`cluster`), and every private
Ray / Optuna API used (`private`).
"""
