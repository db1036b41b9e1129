"""Prefect flows. Entry point for deployments: `flows/pretrain.py:pretrain`."""
