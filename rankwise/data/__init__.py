"""Text in, token windows out: the shipped texts (texts/), sources and mixtures, windows
sampled from the model itself (windows.py), and the calibration recipe (config.py)."""
