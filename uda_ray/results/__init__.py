"""Results: the Parquet tables (`tables`, their rows in `rows`), the queries over them (`queries`), the one
statistics module (`stats`), the text the command line prints (`text`), the HTML report (`report`, with
`report_data` and `figures`), the pipeline's markdown table (`markdown`), and the optional TensorBoard and
MLflow logs.
"""
