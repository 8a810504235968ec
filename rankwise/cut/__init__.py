"""What a compression does: compress_ (compress.py) over the recipe (config.py) and its
budget (budget.py), one plan per cut (plans.py), what the plans are handed (surgery.py:
the recipe, the work and the target with its surgery), how the forms are chosen
(choosing.py), the two-stream pass (streamed.py), decompositions and prices spread over
processes (solving.py) and the rank search (search.py)."""
