# pg-reaper container image: the daemon in a virtualenv on Python's slim Debian image, non-root.
#
#   docker build -t pg-reaper .
#   docker run --rm -v "$PWD/config.toml:/etc/pg-reaper/config.toml:ro" -p 9188:9188 pg-reaper
#
# The configuration is not in the image: mount it at /etc/pg-reaper/config.toml. In a container
# [metrics] listen must reach beyond loopback to be scraped from outside: ":9188" (every address,
# IPv6 and IPv4), "0.0.0.0:9188" or the pod IP; the HEALTHCHECK below asks 127.0.0.1:9188, which
# the first two cover. docs/deploy.md has more.
#
# The base image is pinned to a full version. Pin its digest as well (FROM ...@sha256:...) in a
# registry you control, and let a bot such as Renovate or Dependabot move both.

FROM python:3.11.14-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package build reads: the project metadata, the README it names, the sources.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY reaper/ reaper/

# psycopg[binary], pydantic-core and the rest come as manylinux wheels: no compiler needed.
# With the extra [notify] (apprise), so that [notify] urls work in the image as they are.
# pip and setuptools are removed from the venv afterwards: the image never installs anything.
RUN python -m venv /opt/pg-reaper \
    && /opt/pg-reaper/bin/pip install --no-cache-dir ".[notify]" \
    && /opt/pg-reaper/bin/pip uninstall --yes --no-cache-dir pip setuptools \
    && /opt/pg-reaper/bin/pg-reaper --version \
    && /opt/pg-reaper/bin/python -c "import apprise"


FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="pg-reaper" \
      org.opencontainers.image.description="Terminates stale PostgreSQL sessions, with metrics and an audit log" \
      org.opencontainers.image.licenses="PostgreSQL"

# A named account for the numeric uid, so that ps, libpq and friends can look it up. No home,
# no shell; the uid is far from the base image's system range and from postgres's 999.
RUN groupadd --gid 10001 pg-reaper \
    && useradd --no-log-init --uid 10001 --gid 10001 \
       --home-dir /nonexistent --shell /usr/sbin/nologin pg-reaper \
    && install -d -m 0755 /etc/pg-reaper

COPY --from=build /opt/pg-reaper /opt/pg-reaper

# Logs go to stderr as JSON lines (not a TTY); the root filesystem can be read-only.
ENV PATH="/opt/pg-reaper/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 10001:10001
EXPOSE 9188

# /healthz answers 200 while the scheduler runs. No curl in slim images: Python's urllib.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9188/healthz', timeout=4).status != 200)"]

ENTRYPOINT ["pg-reaper"]
CMD ["run", "-c", "/etc/pg-reaper/config.toml"]
