# ctmae on a CUDA-enabled PyTorch base image. Scans are mounted read-only at /data, outputs go to /runs:
#   docker build -t ctmae .
#   docker run --gpus all -v /path/to/scans:/data:ro -v $PWD/runs:/runs ctmae pretrain /data --out /runs/exp1
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

WORKDIR /opt/ctmae
COPY pyproject.toml README.md ./
COPY ctmae ./ctmae
COPY sample_data ./sample_data
# The base image's torch satisfies ctmae's torch range, so pip keeps it and adds only the rest.
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 1000 ctmae \
    && mkdir -p /data /runs && chown 1000:1000 /runs

USER 1000:1000
# The preprocessing cache lives with the outputs, so it survives the container.
ENV CTMAE_SAMPLE_DATA=/opt/ctmae/sample_data \
    XDG_CACHE_HOME=/runs/.cache
VOLUME ["/runs"]
ENTRYPOINT ["ctmae"]
CMD ["--help"]
