"""Data: BraTS IO, labels, preprocessing, cache, patch sampling, augmentation, DataModule, synthetic cases."""
