# The CDS Hooks service image: gunicorn serving cds.hooks.app:create_app() as a non-root user.
#
#   docker build -t cds-trial-screening .
#   docker run -p 8080:8080 -e CDS_PUBLIC_BASE_URL=https://cds.example.org \
#       -e CDS_CONFIG=/config/cds.toml -v "$PWD/config:/config:ro" cds-trial-screening
#
# Configuration is CDS_* environment variables (read by cds/config.py; CDS_CONFIG names a
# JSON/TOML file for structured settings such as trusted issuers). CDS_BIND and CDS_WORKERS
# are read by scripts/gunicorn-cmd, the one place the gunicorn command line is written.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system cds \
    && useradd --system --gid cds --home-dir /srv/cds --shell /usr/sbin/nologin cds \
    && mkdir -p /srv/cds /var/lib/cds \
    && chown cds:cds /var/lib/cds

WORKDIR /srv/cds
# Only what the package build needs: no tests, fixtures, venvs or local state in the image.
COPY pyproject.toml README.md ./
COPY cds ./cds
RUN pip install . && rm -rf build ./*.egg-info
COPY scripts/gunicorn-cmd /usr/local/bin/cds-gunicorn

ENV CDS_BIND=0.0.0.0:8080 \
    CDS_WORKERS=2 \
    CDS_FEEDBACK_DB=/var/lib/cds/cds-feedback.sqlite3

USER cds
EXPOSE 8080
# No curl in the slim image: the standard library does it. Non-2xx or no answer -> exit 1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('CDS_BIND', '0.0.0.0:8080').rsplit(':', 1)[1]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
CMD ["cds-gunicorn"]
