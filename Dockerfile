# ctmae on a CUDA-enabled PyTorch base image. Scans are mounted read-only at /data, outputs go to /runs, and the
# container runs as the user who owns the output folder:
#   docker build -t ctmae .
#   docker run --rm --gpus all --user "$(id -u):$(id -g)" --shm-size 2g \
#       -v /path/to/scans:/data:ro -v "$PWD/runs:/runs" ctmae pretrain /data --out /runs/exp1
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

WORKDIR /opt/ctmae
COPY pyproject.toml README.md ./
COPY ctmae ./ctmae
COPY sample_data ./sample_data
# The base image's torch satisfies ctmae's torch range, so pip keeps it and adds only the rest. No user is created:
# a fixed uid collides with the base's own (Ubuntu 24.04 images ship `ubuntu` as uid 1000) and rarely matches the
# host folder's owner; any uid given with --user works, since nothing is written outside /runs and /tmp.
RUN pip install --no-cache-dir . \
    && mkdir -p /data /runs \
    && chmod 1777 /runs

# Any uid may write to an anonymous /runs volume (sticky, like /tmp). HOME and every cache live under /runs, so they
# outlive the container; USER names a user for tools that ask for one although the uid has no passwd entry.
ENV CTMAE_SAMPLE_DATA=/opt/ctmae/sample_data \
    HOME=/runs \
    XDG_CACHE_HOME=/runs/.cache \
    USER=ctmae
USER 1000:1000
VOLUME ["/runs"]
ENTRYPOINT ["ctmae"]
CMD ["--help"]
