# One image for every Windflow service; docker-compose.yml picks the service by command
# (`windflow serve router|session|worker|gateway ...`). etcd and NATS run from their own
# official images there, not from this one.
#
# torch: requirements.lock pins torch==2.13.0. From PyPI, inside a Linux container, that
# pin resolves to the CUDA build (several GB of nvidia-* wheels). By default this image
# takes the CPU build from PyTorch's CPU index instead (the pin matches 2.13.0+cpu), which
# is what the default model needs and keeps the image small. For GPU workers build with
#   docker build --build-arg TORCH_INDEX_URL= .
# to get PyPI's CUDA build (run them with the NVIDIA container runtime).
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so code changes do not reinstall them.
COPY requirements.lock ./
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r requirements.lock

COPY pyproject.toml README.md ./
COPY windflow ./windflow
COPY services ./services
COPY kernels ./kernels
RUN pip install --no-deps . \
    && useradd --create-home --uid 10001 windflow

USER windflow
# Every service listens here inside its container (see docker-compose.yml).
EXPOSE 50051
ENTRYPOINT ["windflow"]
CMD ["--help"]
