# calmrun worker image. Build: docker build -t calmrun:local .   Run: docker run calmrun:local worker -w FILE
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app

COPY pyproject.toml README.md /app/
# calmrun/schemas is a symlink to ../schemas: copy the real directory first. COPY of a directory keeps
# symlinks inside it as symlinks, so /app/calmrun/schemas -> ../schemas resolves to /app/schemas.
COPY schemas /app/schemas
COPY calmrun /app/calmrun
# the example workflow, its agents (imported as examples.triage.agents) and its model configuration
COPY examples /app/examples

RUN test -d /app/calmrun/schemas \
    && pip install --no-cache-dir . \
    && rm -rf /app/build

RUN useradd --create-home --uid 10001 --user-group calmrun
USER calmrun
# agent references (module:attr) resolve from the working directory: /app holds examples/
WORKDIR /app

# Serve /metrics on all interfaces of the container (the settings default is 127.0.0.1, port 0 = off).
ENV CALMRUN_METRICS__HOST=0.0.0.0 \
    CALMRUN_METRICS__PORT=9464
EXPOSE 9464

ENTRYPOINT ["calmrun"]
CMD ["worker", "-w", "examples/triage/workflow.yaml", "-c", "examples/triage/models.yaml"]
