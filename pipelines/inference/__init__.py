"""Drawing images from a trained model: the frozen encoders, seeded sampling, the export format, the MLflow
model.
"""
