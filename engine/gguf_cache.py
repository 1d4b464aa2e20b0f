"""Convert a GGUF file once into a HF model directory, cached by content.

transformers de-quantises GGUF (``from_pretrained(dir, gguf_file=name)``); we save the
result as config.json + safetensors + tokenizer + generation_config so every later start
(and every replica on the node) loads a plain HF directory in a second instead of
de-quantising again.

Cache layout: ``<cache root>/<gguf stem>-<content key>/``, where the key hashes the file's
bytes and ``CONVERTER_VERSION``. Conversion writes into a temporary sibling directory and
renames it into place, so a crash never leaves a half-written cache entry; a file lock
makes concurrent replicas wait for one conversion instead of racing through several.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import xxhash

#: Bump when the converted layout changes, so old cache entries are not reused.
CONVERTER_VERSION = "1"
CACHE_ENV = "KVFERRY_CACHE_DIR"


def cache_root(cache_dir: Path | None = None) -> Path:
    """The argument, else ``$KVFERRY_CACHE_DIR``, else ``~/.cache/kvferry/models``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvferry" / "models"


def content_key(gguf_path: Path) -> str:
    """16 hex chars of xxh3-128 over the file's bytes (and the converter version)."""
    h = xxhash.xxh3_128()
    h.update(f"kvferry-gguf-v{CONVERTER_VERSION}".encode())
    with open(gguf_path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


def cached_dir_for(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Where the converted directory of ``gguf_path`` lives (whether or not it exists yet)."""
    return cache_root(cache_dir) / f"{gguf_path.stem}-{content_key(gguf_path)}"


def is_complete(path: Path) -> bool:
    """A finished entry has a config and weights (single file or sharded index)."""
    weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return (path / "config.json").is_file() and weights


def converted_gguf_dir(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Return the HF directory converted from ``gguf_path``, converting on first use."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise ValueError(f"GGUF file {gguf_path} does not exist")
    target = cached_dir_for(gguf_path, cache_dir)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock"):
        if is_complete(target):  # another process converted it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            try:
                convert_gguf(gguf_path, tmp)
            except Exception as e:  # transformers raises many types for unsupported files
                raise ValueError(f"cannot convert {gguf_path.name} to a HF model: {e}") from e
            if target.exists():  # a stale, incomplete entry (written by hand?): replace it
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantise ``gguf_path`` with transformers and save it as a HF directory in ``out_dir``."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf_path.parent), gguf_path.name
    steps = ("reading config", "reading tokenizer", "de-quantising weights", "writing safetensors")
    with Progress(
        TextColumn(f"converting {name}: [bold]{{task.description}}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),  # stdout may carry a server's or CLI's real output
    ) as progress:
        task = progress.add_task(steps[0], total=len(steps))
        config = AutoConfig.from_pretrained(src, gguf_file=name, local_files_only=True)
        progress.update(task, advance=1, description=steps[1])
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name, local_files_only=True)
        progress.update(task, advance=1, description=steps[2])
        model = AutoModelForCausalLM.from_pretrained(
            src, gguf_file=name, config=config, dtype=torch.float32, local_files_only=True
        )
        progress.update(task, advance=1, description=steps[3])
        _save_plain(model, out_dir)
        tokenizer.save_pretrained(out_dir)
        progress.update(task, advance=1, description="done")


def _save_plain(model: Any, out_dir: Path) -> None:
    """Save a de-quantised model as plain fp32 safetensors + config + generation config.

    ``model.save_pretrained`` refuses models loaded from GGUF ("not serializable"), so we
    write the state dict ourselves and drop the GGUF quantization marker from the config.
    """
    from safetensors.torch import save_file

    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {
        name: tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
        if not (tied and name == "lm_head.weight")  # shares storage with the embeddings
    }
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = [type(model).__name__]
    config.dtype = "float32"
    config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
