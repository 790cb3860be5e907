"""What every stage shares: typed configs, storage (local paths and URIs), MLflow tracking, the Ray runtime.
"""
