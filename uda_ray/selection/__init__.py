"""Selection without target labels: the label-free validators, the validator study (how far each can be
trusted), and seed variance of a sweep's winners.
"""
