# ckptscope as a service: two stages, slim Python 3.11, non-root, data volume at /data.
#
#   docker build -t ckptscope .
#   docker run -p 8000:8000 -v ckpt-data:/data -e CKPTSCOPE_API_TOKEN=... ckptscope
#
# torch is installed exactly as CI installs it: scripts/setup.sh (which also fetches gcc here, for
# the optional stats kernel), which installs ckptscope as a regular (non-editable) package, so only
# the venv reaches the final stage. It installs
# ${TORCH_SPEC:-torch==2.13.0} before the project. To get the CPU-only build (a few hundred MB
# instead of several GB), put CPU wheels in ./wheelhouse (pip download or copy them there): the
# build passes it to pip as PIP_FIND_LINKS. PIP_EXTRA_INDEX_URL can point at a CPU wheel index.

FROM python:3.11-slim AS build
ARG TORCH_SPEC=torch==2.13.0
ARG PIP_EXTRA_INDEX_URL=
ENV CKPTSCOPE_VENV=/opt/venv \
    TORCH_SPEC=${TORCH_SPEC} \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PIP_FIND_LINKS=/src/wheelhouse \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY scripts ./scripts
COPY ckptscope ./ckptscope
COPY wheelhouse ./wheelhouse
RUN bash scripts/setup.sh --runtime

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CKPTSCOPE_DATA_DIR=/data \
    CKPTSCOPE_HOST=0.0.0.0 \
    CKPTSCOPE_PORT=8000
RUN groupadd --system ckptscope && useradd --system --gid ckptscope --home /data ckptscope \
    && mkdir -p /data && chown ckptscope:ckptscope /data
COPY --from=build /opt/venv /opt/venv
WORKDIR /data
USER ckptscope
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4); sys.exit(0)"]
CMD ["ckptscope", "serve", "--host", "0.0.0.0"]
