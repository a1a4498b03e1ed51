"""`neobert-pipeline sync`: keep a vector database or lake table equal to an output's current view.

log.py reads what the output holds and what a target has to apply; rows.py shapes the rows a target
stores; run.py applies the log; targets/ holds one module per kind of target.
"""
