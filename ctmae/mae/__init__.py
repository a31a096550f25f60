"""The masked autoencoder: config, masking registry, model, crop stream and the pretraining loop."""
