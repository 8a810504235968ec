"""What a metric measures: calibration statistics from hooks (hooks.py: covariances,
sampled-label gradients, token weights) and the registry of projection metrics
(metrics.py: which statistics each needs and how they form a projection's weights)."""
