-- Run once by the postgres image on an empty data volume (docker-entrypoint-initdb.d), as POSTGRES_USER.
-- One database per tool: MLflow and Optuna both keep an alembic_version table, so they cannot share one.
CREATE DATABASE mlflow;
CREATE DATABASE optuna;
CREATE DATABASE prefect;
CREATE DATABASE feedback;  -- POST /feedback (pipeline/feedback_store.py)
