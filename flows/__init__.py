"""Prefect flows: the pipeline as it reads on a whiteboard; no tensor math here."""
