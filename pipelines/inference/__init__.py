"""Drawing images from a trained model: the frozen encoders, seeded sampling, the export format and its
diffusers-format copy, the MLflow model.
"""
