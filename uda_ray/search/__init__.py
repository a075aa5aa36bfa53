"""Search: the search-space YAML (`space`) and Ray Tune with Optuna and ASHA (`tune`): searcher, scheduler,
trial driver, cluster start-up.
"""
