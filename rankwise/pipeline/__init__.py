"""How calibration data moves through a model on its way to the statistics: block by
block (sequential). A pipeline moves data and hands each block's fresh statistics to
rankwise.compress, which cuts; it never decomposes or swaps anything itself."""
