"""Training a VAE on the filtered images (the offline pipeline's own autoencoder)."""
