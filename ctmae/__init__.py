"""ctmae: masked autoencoder pretraining for CT volumes."""

__version__ = "0.1.0"
