"""The registered model's code, logged as an MLflow "model from code" (pipelines/inference/mlflow_model.py):
MLflow runs this file to load the model, so loading unpickles nothing; the weights come from the model's
artifacts in TextToImageModel.load_context.

set_model at import is the point of this file, and why nothing else imports it."""

import mlflow.models

from pipelines.inference.mlflow_model import TextToImageModel

mlflow.models.set_model(TextToImageModel())
