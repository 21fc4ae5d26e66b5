# distil-run GPU image: CUDA PyTorch, the project and its pinned Ray/DeepSpeed, a non-root user.
# Nothing is compiled at run time: DeepSpeed is installed without its C++/CUDA ops (DS_BUILD_OPS=0)
# and the training code hands it a torch optimizer, so no op is ever JIT-built.
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    DS_BUILD_OPS=0 \
    HF_HOME=/tmp/hf \
    TORCH_EXTENSIONS_DIR=/tmp/torch_extensions

WORKDIR /app

# Dependencies first (a layer that survives code changes); torch stays the image's CUDA build.
COPY pyproject.toml README.md ./
COPY distil/__init__.py distil/__init__.py
RUN python -m pip install --no-cache-dir -e ".[eval]" \
    && python -c "import torch, ray, deepspeed; assert ray.__version__ == '2.60.0', ray.__version__"

COPY distil/ distil/
COPY helm/ helm/
COPY jobs/ jobs/
COPY configs/ configs/
COPY data/brown/ data/brown/

RUN groupadd --gid 1000 distil \
    && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin distil \
    && chown -R 1000:1000 /app
USER 1000:1000

ENTRYPOINT []
CMD ["python", "jobs/distill.py", "--help"]
