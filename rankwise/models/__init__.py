"""What a model is made of: the layers a compression puts in place of a linear map
(layers.py), its blocks and targets (blocks.py), the fusion of factored layers that read
one input (fusion.py), and the host it runs on (host.py)."""
