"""How calibration data and the model move while a compression measures it: the block walk
(walk.py: statistics one block at a time, forward then back), the two-stream walk
(streams.py: the dense and the compressed model's activations side by side, block by
block, for the anchored cut), on a placement (placement.py: which device works, where the
blocks wait), activations and factors parked on disk (spill.py), and many processes under
torchrun (distributed.py). A pipeline moves data and hands each block's statistics to
rankwise.cut.compress, which decomposes and cuts; it never decomposes anything itself."""
