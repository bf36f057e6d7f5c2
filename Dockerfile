# One image for every hitless service; the command picks which one runs.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY hitless ./hitless
COPY controller_svc ./controller_svc
COPY gateway_daemon ./gateway_daemon
COPY notifier ./notifier
COPY upgradectl ./upgradectl
COPY migrations ./migrations
RUN pip install --no-cache-dir .
ENV HITLESS_DATA_DIR=/var/lib/hitless
