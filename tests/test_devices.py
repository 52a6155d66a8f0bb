"""Split models: the embedded model with blocks offloaded to disk by accelerate equals the unsplit model.

The only devices here are the CPU and the disk, so the split is real but one-sided: the later blocks live in
an offload folder (their parameters are `meta` in memory and are read back at every forward), the rest on the
CPU. Both backends, prefix reuse on and off: activations, log-odds and greedy steered generation with the
edit at a block in the offloaded part. Plus the HF-folder path (`from_pretrained(device_map=...)`) and an
adapter merged before dispatch, on a tiny model.
"""
from __future__ import annotations

import pytest
import torch

from afprobe.activations.backends import SITES, make_backend
from afprobe.activations.devices import input_device, is_split, mixes_offload_and_gpu
from afprobe.activations.loading import load_model, model_fingerprint, tiny_llama
from afprobe.activations.steering import SteeringRunner, SteeringSpec
from afprobe.errors import BadInput
from afprobe.parity import ACCEPT, REJECT
from tests.test_backends import _prompts, _read_all
from tests.test_steering import _prompt, _unit

TOL = 1e-4  # absolute, fp32: the same weights and the same ops, only their placement differs
OFFLOADED = 25  # a block on disk in both splits below
LAYERS = [0, 12, 19, 20, OFFLOADED, 29]
MAX_NEW = 6


def _explicit_map(n_layers: int = 30, first_on_disk: int = 20) -> dict[str, str]:
    places = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    places.update({f"model.layers.{i}": "cpu" if i < first_on_disk else "disk" for i in range(n_layers)})
    return places


@pytest.fixture(scope="module")
def split_backends(tmp_path_factory):
    """nnsight on the embedded model split by an explicit map; TransformerLens on one split by `max_memory`
    (accelerate's planner fills 300 MB of CPU, the rest goes to disk). Separate instances: booting a bridge
    rewires its model in place."""
    folder = tmp_path_factory.mktemp("offload")
    explicit, _ = load_model("smollm2-135m-instruct", device_map=_explicit_map(), offload_folder=str(folder / "a"))
    planned, tok = load_model("smollm2-135m-instruct", device_map="auto", max_memory={"cpu": "300MB"},
                              offload_folder=str(folder / "b"))
    return {"nnsight": make_backend("nnsight", explicit, tok), "transformer_lens": make_backend("transformer_lens",
                                                                                                planned, tok)}


def test_the_split_is_real(split_backends, smol):
    for backend in split_backends.values():
        placed = backend.model.hf_device_map
        assert is_split(backend.model) and {"cpu", "disk"} <= set(placed.values())
        assert placed[f"model.layers.{OFFLOADED}"] == "disk"
        assert backend.model.model.layers[OFFLOADED].mlp.down_proj.weight.device.type == "meta"
        assert input_device(backend.model) == torch.device("cpu")
    # offloaded weights are read back: the same model has the same fingerprint however it is placed
    assert model_fingerprint(split_backends["nnsight"].model) == model_fingerprint(smol[0])


@pytest.mark.parametrize("backend_name", ["nnsight", "transformer_lens"])
def test_split_activations_equal_unsplit(split_backends, smol_backends, smol_tokenizer, backend_name):
    seqs = _prompts(smol_tokenizer, 3)
    earliest = [len(s) - 4 for s in seqs]
    for reuse in (False, True):
        got = _read_all(split_backends[backend_name], seqs, LAYERS, reuse, earliest)
        ref = _read_all(smol_backends[backend_name], seqs, LAYERS, reuse, earliest)
        assert set(got[0]) == {(layer, site) for layer in LAYERS for site in SITES}
        worst = max((got[i][k] - ref[i][k]).abs().max().item() for i in ref for k in ref[i])
        print(f"{backend_name} reuse={reuse}: split vs unsplit activations max |diff| {worst:.3g}")
        assert worst < TOL, (backend_name, reuse, worst)


@pytest.mark.parametrize("backend_name", ["nnsight", "transformer_lens"])
def test_split_steering_equals_unsplit(split_backends, smol_backends, smol_tokenizer, backend_name):
    """Greedy completions steered at an offloaded block (reuse off and on), and log-odds unsteered, steered there
    and with the direction ablated at every block (reuse on)."""
    prompts = [_prompt(smol_tokenizer, u, label=i % 2) for i, u in enumerate(("Write one sentence about the sea.",
                                                                            "Name a planet."))]
    unit = _unit(smol_backends[backend_name].model)
    steer = SteeringSpec("probe", unit, 30.0, (OFFLOADED,), alpha=1.0)
    for reuse in (False, True):
        split = SteeringRunner(split_backends[backend_name], prefix_reuse=reuse)
        whole = SteeringRunner(smol_backends[backend_name], prefix_reuse=reuse)
        assert split.generate_ids(prompts, steer, MAX_NEW) == whole.generate_ids(prompts, steer, MAX_NEW)
    odds = {}
    for spec in (None, steer, SteeringSpec("ablation", unit, 30.0, (OFFLOADED,))):
        a, b = split.log_odds(prompts, spec, ACCEPT, REJECT), whole.log_odds(prompts, spec, ACCEPT, REJECT)
        worst = max(abs(x - y) for x, y in zip(a, b))
        print(f"{backend_name} {spec and spec.direction}: split vs unsplit log-odds max |diff| {worst:.3g}")
        assert worst < TOL, (backend_name, spec and spec.direction)
        odds[spec and spec.direction] = a
    assert max(abs(x - y) for x, y in zip(odds[None], odds["probe"])) > 0.1, "the steering must matter"


def test_tiny_hf_folder_split_with_adapter(tmp_path, smol_tokenizer):
    """An HF folder placed by `from_pretrained(device_map=...)` with disk offload, and with a LoRA adapter
    (merged on the CPU, then dispatched): logits and fingerprints equal the unsplit model's."""
    from peft import LoraConfig, get_peft_model

    tiny_llama(seed=0).save_pretrained(tmp_path / "hf")
    smol_tokenizer.save_pretrained(tmp_path / "hf")
    torch.manual_seed(1)
    lora = get_peft_model(tiny_llama(seed=0), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                         target_modules=["q_proj", "v_proj", "down_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    places = _explicit_map(n_layers=4, first_on_disk=2)
    ids = torch.tensor([_prompts(smol_tokenizer, 1)[0]])
    out = {}
    for name, kwargs in {"plain": {}, "split": dict(device_map=places, offload_folder=str(tmp_path / "o1")),
                         "adapter": dict(adapter=str(tmp_path / "lora")),
                         "adapter_split": dict(adapter=str(tmp_path / "lora"), device_map=places,
                                               offload_folder=str(tmp_path / "o2"))}.items():
        model, _ = load_model(str(tmp_path / "hf"), device="cpu", **kwargs)
        assert is_split(model) == ("device_map" in kwargs)
        with torch.inference_mode():
            out[name] = (model(ids).logits, model_fingerprint(model))
    assert (out["split"][0] - out["plain"][0]).abs().max() < TOL and out["split"][1] == out["plain"][1]
    assert (out["adapter_split"][0] - out["adapter"][0]).abs().max() < TOL
    assert out["adapter_split"][1] == out["adapter"][1] != out["plain"][1]
    assert (out["adapter"][0] - out["plain"][0]).abs().max() > 1e-2  # the adapter matters


def test_device_map_errors(tmp_path):
    with pytest.raises(BadInput, match="offload_folder"):
        load_model("smollm2-135m-instruct", device_map=_explicit_map())
    with pytest.raises(BadInput, match="max_memory needs model.device_map"):
        load_model("smollm2-135m-instruct", max_memory={"cpu": "1GB"})
    assert mixes_offload_and_gpu({"a": 0, "b": "cpu"}) and not mixes_offload_and_gpu({"a": 0, "b": 1})
    assert not mixes_offload_and_gpu({"a": "cpu", "b": "disk"})


def test_transformer_lens_refuses_offload_mixed_with_gpus(tiny_model, smol_tokenizer):
    """TransformerLens 4.3 rejects maps mixing CPU/disk offload with GPUs: exit 2 naming the backend. (No GPU
    here, so the realized map is stated on the model as accelerate would record it.)"""
    tiny_model.hf_device_map = {"model.embed_tokens": 0, "model.layers": 0, "model.norm": "cpu", "lm_head": "cpu"}
    with pytest.raises(BadInput, match="transformer_lens cannot run a device_map that mixes"):
        make_backend("transformer_lens", tiny_model, smol_tokenizer)


def test_gpu_check_without_cuda_exits_2():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.strip() == "gpu-check: no CUDA device"
