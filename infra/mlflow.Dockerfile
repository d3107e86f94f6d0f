# syntax=docker/dockerfile:1.7
# MLflow tracking + registry server: PostgreSQL backend store, S3-compatible artefact store
# proxied by the server (--serve-artifacts), so clients need no object-store credentials; the
# `auth` extra brings MLflow's basic-auth app (MLFLOW_APP_NAME=basic-auth in infra/k8s/mlflow.yaml).
#   docker build -f infra/mlflow.Dockerfile -t ghcr.io/radsynth/mlflow:3.17.2 .
FROM python:3.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 MLFLOW_ENABLE_TELEMETRY=false DO_NOT_TRACK=1
RUN pip install "mlflow[auth]==3.17.2" "psycopg2-binary==2.9.13" "boto3==1.44.5" \
 && useradd --create-home --uid 1000 mlflow
COPY --chown=mlflow:mlflow mlflow/start-server.sh /usr/local/bin/start-mlflow-server
USER 1000
EXPOSE 5000
ENTRYPOINT ["/usr/local/bin/start-mlflow-server"]
