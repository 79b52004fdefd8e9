-- Run once by the postgres image on an empty volume: MLflow gets its own database.
CREATE DATABASE mlflow;
