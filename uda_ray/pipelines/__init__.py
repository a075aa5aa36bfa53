"""Pipelines: multi-stage runs (`runner`) and the actions between training stages (`actions`): pseudo-labels,
the IntraDA entropy ranking, ensemble evaluation.
"""
