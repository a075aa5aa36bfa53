"""Results: the Parquet tables (`tables`), the text the command line prints (`text`), the HTML report,
and the optional TensorBoard and MLflow logs.
"""
