"""What a layer can become, and what it costs: the registry of forms (registry.py) and the
forms themselves (kinds.py), the integer grids and their stored bits (grids.py), rounding
onto them (rounding.py), each form's price in the K-FAC metric (pricing.py), and spending
one budget over every layer's options (allocate.py: ranks and forms)."""
from . import kinds  # noqa: F401  (registers the forms)
