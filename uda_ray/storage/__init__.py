"""Storage: the driver lock of a sweep, run or pipeline folder (`lock`).
"""
