"""How calibration data and the model move while a compression measures it: the block walk
(walk.py) on a placement (placement.py: which device works, where the blocks wait),
activations and factors parked on disk (spill.py), and many processes under torchrun
(distributed.py). A pipeline moves data and hands each block's statistics to
rankwise.compress, which decomposes and cuts; it never decomposes anything itself."""
