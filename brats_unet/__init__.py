"""brats-unet: 3D U-Net brain-tumour segmentation on BraTS (PyTorch Lightning + Hydra)."""

__version__ = "0.1.0"
