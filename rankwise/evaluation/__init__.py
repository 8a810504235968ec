"""What users count: perplexity, KL and top-1 against the dense model (scoring.py),
lm-eval tasks (tasks.py), generate speed (speed.py), the HTML report (report.py) and
pictures (plots.py)."""
