"""The data stages: download (img2dataset), filter, precompute (VAE latents + text embeddings), the feature
schema and the training loader.
"""
