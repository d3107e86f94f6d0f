#!/bin/sh
# Start the MLflow tracking + registry server. Configuration comes from the environment so the
# same script serves a laptop (defaults: SQLite + local folder, as params.yaml's paths) and a
# cluster (infra/k8s/mlflow.yaml: PostgreSQL + S3-compatible object store).
#
#   MLFLOW_BACKEND_STORE_URI   default sqlite:///mlruns/mlflow.db
#                              cluster: postgresql://USER:PASSWORD@postgres:5432/mlflow
#   MLFLOW_ARTIFACTS_DESTINATION default ./mlruns/artifacts ; cluster: s3://radsynth-mlflow
#   MLFLOW_S3_ENDPOINT_URL     S3-compatible endpoint (MinIO, Ceph, ...); unset for AWS S3
#   AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY   object-store credentials (server side only)
#   MLFLOW_HOST (0.0.0.0 in a container, default 127.0.0.1), MLFLOW_PORT (5000), MLFLOW_WORKERS (2)
#   MLFLOW_ALLOWED_HOSTS       Host headers accepted (DNS-rebinding protection), default
#                              localhost:*,127.0.0.1:*; cluster: mlflow,mlflow.radsynth.svc...
#   MLFLOW_METRICS_DIR         when set, Prometheus metrics are exposed on /metrics
#   MLFLOW_APP_NAME            e.g. basic-auth: MLflow's authentication app (cluster; needs mlflow[auth];
#                              MLFLOW_AUTH_CONFIG_PATH names its basic_auth.ini). Unset: no authentication,
#                              for the loopback-only local UI.
#
# --serve-artifacts proxies artefact uploads and downloads through the server, so training
# pods and Triton's init container need only the tracking URI, never object-store keys.
set -eu
BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///mlruns/mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-./mlruns/artifacts}"
case "$BACKEND" in
  sqlite:///*) mkdir -p "$(dirname "${BACKEND#sqlite:///}")" ;;
esac
exec mlflow server \
  --backend-store-uri "$BACKEND" \
  --artifacts-destination "$ARTIFACTS" \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-127.0.0.1}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-2}" \
  --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-localhost:*,127.0.0.1:*}" \
  ${MLFLOW_METRICS_DIR:+--expose-prometheus "$MLFLOW_METRICS_DIR"} \
  ${MLFLOW_APP_NAME:+--app-name "$MLFLOW_APP_NAME"}
