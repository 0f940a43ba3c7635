"""gunicorn's config file for the container command (``scripts/gunicorn-cmd`` runs
``gunicorn -c python:cds.hooks.gunicorn_conf``): the same settings as ``cds serve``, from
:func:`cds.hooks.serve.gunicorn_settings`; bind, workers and threads from ``CDS_BIND``,
``CDS_WORKERS`` and ``CDS_THREADS`` (read by cds.config)."""

from __future__ import annotations

import os

from cds.config import server_options
from cds.hooks.serve import gunicorn_settings

_settings = gunicorn_settings(**server_options(os.environ))

# gunicorn reads a config file's module-level names.
bind = _settings["bind"]
workers = _settings["workers"]
worker_class = _settings["worker_class"]
threads = _settings["threads"]
timeout = _settings["timeout"]
graceful_timeout = _settings["graceful_timeout"]
keepalive = _settings["keepalive"]
accesslog = _settings["accesslog"]
on_starting = _settings["on_starting"]
post_worker_init = _settings["post_worker_init"]
