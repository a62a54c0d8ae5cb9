"""The method's stages: training images (data.py), the SurgUn loss and loop (train.py), localization, calibration."""
