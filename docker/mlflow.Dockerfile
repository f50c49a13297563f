# MLflow tracking server for the cluster (infra/mlflow/): the official image lacks the PostgreSQL driver and
# boto3 for S3 artifacts. Build from the repository root:
#   docker build -f docker/mlflow.Dockerfile -t ubt-mlflow:3.17.2 .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# same mlflow/botocore pins as the clients in the worker image
COPY constraints.txt /tmp/constraints.txt
RUN pip install -c /tmp/constraints.txt mlflow boto3 psycopg2-binary \
 && rm /tmp/constraints.txt \
 && useradd --create-home --uid 1000 mlflow

USER 1000
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--help"]
