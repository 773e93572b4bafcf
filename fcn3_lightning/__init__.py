"""fcn3-lightning: train, fine-tune and evaluate FourCastNet 3 with PyTorch Lightning."""

__version__ = "0.1.0"
