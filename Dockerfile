# ckptscope as a service: two stages, Python 3.11 slim, a fixed non-root user (10001:10001), data
# volume at /data. README "Docker" has the details; scripts/docker-smoke.sh builds and checks it in CI.
#
#   docker build -t ckptscope .
#   docker run -p 8000:8000 -v ckpt-data:/data -e CKPTSCOPE_API_TOKEN=... ckptscope
#
# Build arguments:
#   BASE_IMAGE          the base of both stages; the real python:3.11-slim pinned by digest (CI
#                       builds a local stand-in under the tag python:3.11-slim: scripts/docker-base.sh)
#   TORCH_VERSION       2.13.0
#   TORCH_VARIANT       cpu (default): torch==$TORCH_VERSION+cpu, a few hundred MB;
#                       cuda: PyPI's torch==$TORCH_VERSION, the CUDA build (several GB), for GPU
#                       hosts with CKPTSCOPE_STATS_DEVICE=auto; cu126, cu128, ...: that build from
#                       download.pytorch.org
#   TORCH_INDEX_URL     where the +variant build comes from (default
#                       https://download.pytorch.org/whl/$TORCH_VARIANT; "none": only the wheelhouse
#                       and the index)
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL   a private index (or mirror) instead of / beside PyPI
# Files in ./wheelhouse reach the build stage only (never the final image): wheels (offered to pip
# as find-links), ca-bundle.crt (pip's CA bundle, for an index behind a TLS-inspecting proxy),
# constraints.txt (pip constraints), pip.conf (a whole pip configuration, e.g. an index URL with
# credentials). wheelhouse/README.md says more.

ARG BASE_IMAGE=python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_FIND_LINKS=/wheelhouse \
    PIP_DEFAULT_TIMEOUT=60 \
    PATH=/opt/venv/bin:$PATH
# pip's settings from the wheelhouse, when given; every RUN below sources this
RUN printf '%s\n' \
        '[ -f /wheelhouse/ca-bundle.crt ] && export PIP_CERT=/wheelhouse/ca-bundle.crt' \
        '[ -f /wheelhouse/constraints.txt ] && export PIP_CONSTRAINT=/wheelhouse/constraints.txt' \
        '[ -f /wheelhouse/pip.conf ] && export PIP_CONFIG_FILE=/wheelhouse/pip.conf' \
        '[ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL' \
        '[ -n "$PIP_EXTRA_INDEX_URL" ] || unset PIP_EXTRA_INDEX_URL' \
        'true' > /etc/pip-env.sh
# a C compiler for the stats kernel (ckptscope/stats/_kernel.c): the build stage only
RUN command -v cc >/dev/null || { apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null \
        && rm -rf /var/lib/apt/lists/*; }
# 1. torch, alone: the biggest layer changes only with these arguments or the wheelhouse. Byte code
# compiled on both cores (pip's is serial); like pip, files that do not compile (torch's test data
# for newer Pythons) stay source.
COPY wheelhouse /wheelhouse
RUN . /etc/pip-env.sh \
    && python -m venv /opt/venv \
    && case "$TORCH_VARIANT" in \
        cuda) spec="torch==$TORCH_VERSION"; index=none ;; \
        *) spec="torch==$TORCH_VERSION+$TORCH_VARIANT"; index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/$TORCH_VARIANT}" ;; \
    esac \
    && if [ "$index" = none ]; then set -- ; else set -- --extra-index-url "$index"; fi \
    && pip install --quiet --no-compile "$@" "$spec" \
    && { python -m compileall -q -j0 /opt/venv/lib >/dev/null || true; }
# 2. the other dependencies, read from pyproject.toml (torch held where step 1 put it), with the
# optional ones of EXTRAS (e.g. --build-arg EXTRAS=dask for CKPTSCOPE_DASK_SCHEDULER)
ARG EXTRAS=""
COPY pyproject.toml /src/pyproject.toml
RUN . /etc/pip-env.sh \
    && EXTRAS="$EXTRAS" python -c "import os, tomllib; p = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; extras = [e for e in os.environ['EXTRAS'].split(',') if e]; print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" > /tmp/requirements.txt \
    && pip freeze | grep -i '^torch==' > /tmp/torch.txt \
    && pip install --quiet --no-compile -r /tmp/requirements.txt -c /tmp/torch.txt "setuptools>=68" \
    && { python -m compileall -q -j0 /opt/venv/lib >/dev/null || true; }
# 3. the project last: an edit rebuilds only this layer. A wheel (with the compiled kernel),
# installed without dependencies (all there), then checked.
COPY setup.py README.md /src/
COPY ckptscope /src/ckptscope
RUN . /etc/pip-env.sh \
    && pip wheel --quiet --no-deps --no-build-isolation -w /tmp/dist /src \
    && pip install --quiet --no-deps /tmp/dist/ckptscope-*.whl \
    && pip check \
    && python -c "import ckptscope.stats._kernel, numpy, torch"

FROM ${BASE_IMAGE}
ARG UID=10001
ARG GID=10001
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    CKPTSCOPE_DATA_DIR=/data \
    CKPTSCOPE_HOST=0.0.0.0 \
    CKPTSCOPE_PORT=8000
RUN groupadd --gid "$GID" ckptscope \
    && useradd --uid "$UID" --gid "$GID" --no-create-home --home-dir /data --shell /usr/sbin/nologin ckptscope \
    && mkdir -p /data && chown "$UID:$GID" /data
# only what runs: the venv (no wheelhouse, no compiler, no source tree)
COPY --from=build /opt/venv /opt/venv
WORKDIR /data
USER ${UID}:${GID}
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CKPTSCOPE_PORT', '8000'), timeout=4)"]
# host and port from CKPTSCOPE_HOST / CKPTSCOPE_PORT; on SIGTERM (docker stop) uvicorn stops within
# CKPTSCOPE_SHUTDOWN_GRACE_S (5 s), inside Docker's 10 s stop grace
CMD ["ckptscope", "serve"]
