"""What a model spec names, decided without loading anything: `default`, a local folder, a
.gguf file or a Hugging Face Hub id; a path that does not exist is "not found", never a Hub
lookup. Also the checks of a folder's files that need no weights read: safetensors headers
(a truncated or corrupt file is named), and the facts of a config.json that the commands check
their options against (layers, positions).
"""

from __future__ import annotations

import json
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..core.errors import CqilError

MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors format's own limit on a header's size


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # "default", "folder", "gguf" or "hub"
    text: str  # as the user wrote it
    path: Path | None  # the folder or file (None: default, hub)


def is_path_like(spec: str) -> bool:
    """Whether a spec is meant as a path: it starts with /, ., ~, ends with /, has a
    backslash, more than one / or a file suffix, or its first part is a local folder
    (`mymodels/llama` beside a `mymodels/` folder)."""
    if spec.startswith(("/", ".", "~")) or spec.endswith(("/", os.sep)) or "\\" in spec:
        return True
    parts = spec.split("/")
    if len(parts) != 2 or not all(parts):
        return True
    return Path(parts[0]).is_dir() or Path(parts[1]).suffix.lower() in (
        ".gguf", ".safetensors", ".bin", ".json", ".pt", ".pth")


def resolve_model_spec(spec: str) -> ModelSpec:
    """The ModelSpec of what the user wrote, or a one-line "model not found"."""
    spec = str(spec)
    if spec == "default":
        return ModelSpec("default", spec, None)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise CqilError(f"model file not found: {spec}")
        return ModelSpec("gguf", spec, path)
    if path.exists():
        if not path.is_dir():
            raise CqilError(f"{spec}: a model spec must be a folder, a .gguf file, a hub id "
                            "or 'default'")
        return ModelSpec("folder", spec, path)
    if is_path_like(spec):
        missing = _first_missing(path)
        raise CqilError(f"model not found: no folder {spec}" +
                        (f" ({missing} does not exist)" if missing and str(missing) != spec
                         else "") + "; a model is a folder, a .gguf file, a hub id (ORG/NAME) "
                        "or 'default'")
    if spec.count("/") == 1:
        if not hub_cached(spec) and not hub_reachable():
            raise CqilError(f"model not found: no folder {spec}, and as a Hugging Face Hub id it "
                            "is neither in the local cache nor reachable (offline); a model is a "
                            "folder, a .gguf file, a hub id (ORG/NAME) or 'default'")
        return ModelSpec("hub", spec, None)
    raise CqilError(f"model not found: '{spec}' is not a folder, a .gguf file, a hub id "
                    "(ORG/NAME) or 'default'")


def hub_cached(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds the config.json of `repo_id` (it loads offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub library refuses: not cached
        return False


def hub_reachable() -> bool:
    """Whether the Hub can be asked at all: not HF_HUB_OFFLINE, and its host's name resolves
    (an offline machine answers at once; asking the Hub itself retries for half a minute)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return False
    return True


def _first_missing(path: Path) -> Path | None:
    """The first part of a path that does not exist."""
    parts = path.parts
    for i in range(1, len(parts) + 1):
        candidate = Path(*parts[:i])
        if not candidate.exists():
            return candidate
    return None


def check_safetensors(file: Path) -> dict:
    """A one-line CqilError naming the file when a safetensors file is truncated or corrupt:
    its header is read and every tensor's bytes must lie inside the file. Returns the header
    (tensor name -> {dtype, shape, data_offsets})."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise CqilError(f"{file}: not a safetensors file ({size} bytes; truncated?): "
                                "download or write it again")
            length = struct.unpack("<Q", head)[0]
            if length > min(size - 8, MAX_SAFETENSORS_HEADER):
                raise CqilError(f"{file}: corrupt safetensors file (its header claims {length:,} "
                                f"bytes, the file has {size:,}): download or write it again")
            header = json.loads(handle.read(length))
    except OSError as exc:
        raise CqilError(f"{file}: cannot read ({exc.strerror or exc})") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise CqilError(f"{file}: corrupt safetensors file (unreadable header): download or "
                        "write it again") from exc
    if not isinstance(header, dict):
        raise CqilError(f"{file}: corrupt safetensors file (unreadable header)")
    try:
        end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"],
                  default=0)
    except (TypeError, KeyError, IndexError, ValueError) as exc:
        raise CqilError(f"{file}: corrupt safetensors file (bad tensor entries)") from exc
    if 8 + length + end > size:
        raise CqilError(f"{file}: truncated safetensors file ({size:,} bytes of "
                        f"{8 + length + end:,}): download or write it again")
    return header


def check_quantized_header(file: Path, header: dict, weights: dict) -> None:
    """A one-line CqilError when a quantized folder's tensors (runtime/quant_cqil.py's format,
    config `weights`) disagree with each other: codes of the wrong dtype, or scales / zeros
    whose shape does not fit their codes (a mismatched or edited tensor)."""
    group = weights.get("group_size")
    for name, entry in header.items():
        if not name.endswith(".qweight"):
            continue
        prefix = name[: -len("qweight")]
        dtype, (rows, cols) = entry.get("dtype"), entry.get("shape", (0, 0))
        fmt = "int8" if dtype == "I8" else "int4" if dtype == "U8" else None
        if fmt is None:
            raise CqilError(f"{file}: {name} is {dtype}; quantized codes are I8 (int8) or U8 (int4)")
        want = (rows, 1) if fmt == "int8" else (rows, 2 * cols // group if group else -1)
        for part in (("scales",) if fmt == "int8" else ("scales", "zeros")):
            other = header.get(prefix + part)
            shape = tuple(other.get("shape", ())) if other else None
            if shape != want:
                raise CqilError(f"{file}: {prefix}{part} has shape {list(shape) if shape else 'none'}, its "
                                f"{fmt} codes {name} [{rows}, {cols}] need {list(want)}; the file is damaged "
                                "or was edited")


def linear_input_widths(raw: dict) -> tuple[int, ...]:
    """The input widths of a decoder layer's linears per config.json: hidden size (q/k/v,
    gate/up), heads x head dim (o_proj), intermediate size (down); () when unknown."""
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    try:
        hidden, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
        head_dim = int(text.get("head_dim") or hidden // heads)
        return hidden, heads * head_dim, int(text["intermediate_size"])
    except (KeyError, TypeError, ValueError):
        return ()


def config_facts(raw: dict) -> tuple[int | None, int | None]:
    """(layers, positions) of a config.json (a multimodal config's text_config counts)."""
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    layers = raw.get("num_hidden_layers") or text.get("num_hidden_layers")
    positions = raw.get("max_position_embeddings") or text.get("max_position_embeddings")
    return (int(layers) if layers else None, int(positions) if positions else None)
