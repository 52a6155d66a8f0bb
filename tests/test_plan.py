"""`afprobe plan`: parameter counts against real models, memory verdicts for Llama shapes from 8B to 405B,
the embedded model on this CPU machine, LoRA adapter sizes, and the plan `afprobe run` prints."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from afprobe.activations.plan import (
    SAFETY_MARGIN, forward_peak, lora_size, make_plan, shape_from_config, steering_conditions,
)
from afprobe.cli import main
from afprobe.config import load_config, parse_memory
from afprobe.errors import BadInput

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
         "tie_word_embeddings": False, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
         "bos_token_id": 128000, "eos_token_id": 128009}
SHAPES = {  # hidden, layers, heads, KV heads, intermediate
    "8b": (4096, 32, 32, 8, 14336),
    "70b": (8192, 80, 64, 8, 28672),
    "405b": (16384, 126, 128, 8, 53248),
}


def llama_folder(tmp_path: Path, size: str) -> Path:
    """A folder holding only the config.json of a Llama 3 shape."""
    d, layers, heads, kv, ff = SHAPES[size]
    folder = tmp_path / f"llama-{size}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**LLAMA, "hidden_size": d, "num_hidden_layers": layers,
                                                    "num_attention_heads": heads, "num_key_value_heads": kv,
                                                    "intermediate_size": ff}))
    return folder


def write_config(tmp_path: Path, spec: Path | str, **model) -> Path:
    """A small run config (few queries) for `spec`."""
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"model": {"spec": str(spec), "dtype": "bfloat16", **model},
                                    "queries": {"limit": 12}, "steering": {"n_queries": 6}}))
    return path


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["plan", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- parameter counts

def test_parameter_count_matches_a_real_tiny_llama():
    from afprobe.activations.loading import tiny_llama

    model = tiny_llama()
    real = sum(p.numel() for p in model.parameters())
    assert abs(shape_from_config(model.config).params - real) <= 0.001 * real


@pytest.mark.parametrize("family,extra", [
    ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False}),
    ("mistral", {"head_dim": 32}),
    ("qwen2", {}),
    ("qwen3", {"head_dim": 24, "attention_bias": True}),
    ("gemma", {"head_dim": 32}),
    ("gemma2", {"head_dim": 32}),
    ("phi3", {"pad_token_id": 0}),
    ("gpt2", {}),
])
def test_parameter_count_matches_every_family(family, extra):
    """Exact, against the model transformers builds from the same config (on the meta device: no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if family == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=64, n_layer=3, n_head=4, vocab_size=1000, n_positions=256)
    else:
        config = AutoConfig.for_model(family, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, vocab_size=1000,
                                      bos_token_id=1, eos_token_id=2, **extra)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert shape_from_config(config).params == sum(p.numel() for p in model.parameters())


def test_unknown_shape_is_bad_input():
    from transformers import AutoConfig

    with pytest.raises(BadInput, match="cannot size model family 'mixtral'"):
        shape_from_config(AutoConfig.for_model("mixtral"))
    with pytest.raises(BadInput, match="mixture-of-experts"):
        shape_from_config(AutoConfig.for_model("llama", num_local_experts=8))


# ---------------------------------------------------------------- Llama shapes, through the CLI

def test_70b_needs_at_least_two_80gb_gpus(capsys, tmp_path):
    config = write_config(tmp_path, llama_folder(tmp_path, "70b"), device_map="auto")
    out_json = tmp_path / "plan.json"
    code, out, _ = run_cli(capsys, config, "--gpu-memory", "80GB", "--json", out_json)
    assert code == 0
    plan = json.loads(out_json.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert abs(plan["memory"]["weights"] - 141e9) <= 0.02 * 141e9
    assert plan["placement"]["gpus_needed"] == 2  # "80GB" is a card size: 80 GiB, as vendors quote it
    assert "141.1 GB at bfloat16" in out and "estimated" in out and "no tokenizer" in out  # config.json only
    assert out.strip().splitlines()[-1].startswith("fits: 2 x 85.9 GB GPUs needed")
    # the estimate's parts add up to what each device holds
    for dev in plan["placement"]["devices"]:
        assert dev["total"] == dev["weights"] + dev["kv"] + dev["activations"] <= dev["usable"]
    assert sum(d["weights"] for d in plan["placement"]["devices"]) == plan["memory"]["weights"]


def test_70b_on_one_80gb_gpu_is_exit_2_with_one_line(capsys, tmp_path):
    config = write_config(tmp_path, llama_folder(tmp_path, "70b"), device_map="auto")
    code, out, err = run_cli(capsys, config, "--gpus", "1", "--gpu-memory", "80GB")
    assert code == 2
    assert err.startswith("afprobe: error: does not fit") and err.count("\n") == 1 and "Traceback" not in err
    assert "needs" in err and "GPUs" in err


def test_70b_on_two_80gib_gpus_splits_the_layers_evenly(capsys, tmp_path):
    config = write_config(tmp_path, llama_folder(tmp_path, "70b"), device_map="auto")
    out_json = tmp_path / "plan.json"
    code, out, _ = run_cli(capsys, config, "--gpus", "2", "--gpu-memory", "80GiB", "--json", out_json)
    assert code == 0, out
    plan = json.loads(out_json.read_text())
    dmap = plan["placement"]["device_map"]
    on = [dmap[f"model.layers.{i}"] for i in range(80)]
    assert on == sorted(on) and set(on) == {0, 1} and abs(on.count(0) - 40) <= 2
    assert dmap["model.embed_tokens"] == 0 and dmap["lm_head"] == 1
    assert "device map layers 0-" in out.splitlines()[-1] and "-> cuda:1" in out.splitlines()[-1]


def test_70b_without_a_device_map_says_to_set_one(capsys, tmp_path):
    config = write_config(tmp_path, llama_folder(tmp_path, "70b"))
    code, _, err = run_cli(capsys, config, "--gpus", "2", "--gpu-memory", "80GiB")
    assert code == 2 and "set model.device_map: auto" in err


def test_8b_fits_on_one_gpu(capsys, tmp_path):
    config = write_config(tmp_path, llama_folder(tmp_path, "8b"))
    out_json = tmp_path / "plan.json"
    code, out, _ = run_cli(capsys, config, "--gpus", "1", "--gpu-memory", "80GB", "--json", out_json)
    assert code == 0
    plan = json.loads(out_json.read_text())
    assert abs(plan["memory"]["weights"] - 16.06e9) <= 0.02 * 16.06e9
    assert plan["placement"]["gpus_needed"] == 1
    assert out.splitlines()[-1].startswith("fits: 1 x 85.9 GB GPU needed")


def test_405b_says_how_many_80gb_gpus(capsys, tmp_path):
    config = write_config(tmp_path, llama_folder(tmp_path, "405b"), device_map="auto")
    out_json = tmp_path / "plan.json"
    code, out, _ = run_cli(capsys, config, "--gpu-memory", "80GB", "--json", out_json)
    assert code == 0
    plan = json.loads(out_json.read_text())
    n = plan["placement"]["gpus_needed"]
    assert n >= math.ceil(plan["memory"]["weights"] / (80 * 2**30 * (1 - SAFETY_MARGIN)))
    assert len(plan["placement"]["devices"]) == n and f"fits: {n} x 85.9 GB GPUs needed" in out


def test_remote_ndif_needs_no_local_weights(capsys, tmp_path):
    config = write_config(tmp_path, llama_folder(tmp_path, "405b"), remote="ndif")
    code, out, _ = run_cli(capsys, config, "--gpus", "1", "--gpu-memory", "24G")
    assert code == 0
    assert "fits: remote (NDIF): the weights live on the server (811." in out


# ---------------------------------------------------------------- the embedded model, on this machine

def test_embedded_model_fits_on_this_cpu(capsys, tmp_path):
    out_json = tmp_path / "plan.json"
    code, out, _ = run_cli(capsys, "configs/default.yaml", "--set", "queries.limit=10", "--json", out_json)
    assert code == 0
    plan = json.loads(out_json.read_text())
    assert plan["fits"] and plan["placement"]["devices"][0]["name"] == "cpu"
    assert plan["prompts"]["exact"] and "estimated" not in out  # the GGUF file carries the tokenizer
    assert plan["memory"]["weights"] == 4 * plan["model"]["params"]  # float32
    assert plan["stages"]["cache"]["prompts"] == 10 * 3 * 2
    assert out.splitlines()[-1].startswith("fits: cpu")


# ---------------------------------------------------------------- LoRA adapters

def test_bundled_adapter_size_matches_its_weights():
    from safetensors import safe_open

    from afprobe.activations.loading import ADAPTERS_DIR, load_config_only

    folder = ADAPTERS_DIR / "planted-gap"
    size = lora_size(shape_from_config(load_config_only("smollm2-135m-instruct")),
                     json.loads((folder / "adapter_config.json").read_text()))
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert size["params"] == stored


@pytest.mark.parametrize("settings", [
    {"r": 4, "target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1, 3]},
    {"r": 8, "target_modules": "all-linear", "rank_pattern": {"v_proj": 2}},
    {"r": 2, "target_modules": r".*\.mlp\..*_proj"},
])
def test_adapter_size_matches_peft(settings):
    from peft import LoraConfig, get_peft_model

    from afprobe.activations.loading import tiny_llama

    model = tiny_llama()
    shape = shape_from_config(model.config)
    lora = get_peft_model(model, LoraConfig(**settings))
    real = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    assert lora_size(shape, {"peft_type": "LORA", **settings})["params"] == real  # as in adapter_config.json


def test_model_adapter_is_reported(capsys, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 64,
                                                            "target_modules": ["q_proj", "v_proj"]}))
    config = write_config(tmp_path, llama_folder(tmp_path, "8b"), adapter=str(adapter))
    code, out, _ = run_cli(capsys, config, "--gpu-memory", "80GB")
    assert code == 0
    # q: 64 x (4096 + 4096), v: 64 x (4096 + 1024), 32 layers
    assert f"r=64 on 64 modules, {64 * (8192 + 5120) * 32 / 1e6:.1f} M parameters" in out


# ---------------------------------------------------------------- pieces

def test_steering_conditions_match_the_pipeline():
    from afprobe.steering_plan import PlannedDirection, plan_specs

    for steering in ({}, {"mode": "both", "control_alphas": [-2.0, 2.0]}, {"alphas": [1.0, 2.0], "mode": "cross"},
                     {"layers": [1, 3], "controls": ["random"]}, {"direction": "layer3", "controls": ["ablation"]},
                     {"alphas": [0.0, 1.0], "control_alphas": [3.0], "n_random": 2},
                     {"layers": [1, 3], "direction": "refusal"}, {"layers": [1, 3], "direction": "probe_minus_refusal"}):
        cfg = load_config(None, [f"steering.{k}={json.dumps(v)}" for k, v in steering.items()])
        named = steering.get("direction", "best") not in ("best", "refusal", "probe_minus_refusal")
        n_dirs = 2 if steering.get("layers") == [1, 3] and not named else 1
        dirs = [PlannedDirection(torch.nn.functional.normalize(torch.randn(16), dim=0).numpy(), layer, "resid_post",
                                 "last", "diff_means", 1.5, None, "test", 10) for layer in (1, 3)[:n_dirs]]
        assert sum(steering_conditions(cfg.steering).values()) == len(plan_specs(cfg, dirs, 4)), steering


def test_eager_attention_grows_with_the_square_of_the_sequence():
    from afprobe.activations.loading import tiny_llama

    shape = shape_from_config(tiny_llama().config)
    sdpa = [forward_peak(shape, 1, t, t, 2, eager=False) for t in (1000, 2000)]
    eager = [forward_peak(shape, 1, t, t, 2, eager=True) for t in (1000, 2000)]
    assert sdpa[1] / sdpa[0] == pytest.approx(2, rel=0.01)
    assert eager[1] / eager[0] > 3.5 and eager[0] > sdpa[0]


def test_transformer_lens_plans_eager_attention(tmp_path):
    folder = llama_folder(tmp_path, "8b")
    plans = {b: make_plan(load_config(write_config(tmp_path, folder), [f"model.backend={b}"]), 1, "80GB")
             for b in ("nnsight", "transformer_lens")}
    assert plans["transformer_lens"].memory["activation_peak"] > plans["nnsight"].memory["activation_peak"]
    assert "eager" in plans["transformer_lens"].text()


def test_explicit_device_map(tmp_path):
    folder = llama_folder(tmp_path, "8b")
    device_map = {"model.embed_tokens": 0, "model.layers": 0, "model.layers.31": 1, "model.norm": 1, "lm_head": "cpu"}
    cfg = load_config(write_config(tmp_path, folder, device_map=device_map))
    plan = make_plan(cfg, 2, "24GB")
    assert plan.fits and [d["name"] for d in plan.placement["devices"]] == ["cuda:0", "cuda:1", "cpu"]
    assert plan.placement["device_map"]["model.layers.30"] == 0 and plan.placement["device_map"]["model.layers.31"] == 1
    with pytest.raises(BadInput, match="does not place module 'lm_head'"):
        make_plan(load_config(write_config(tmp_path, folder, device_map={"model": 0})), 1, "80GB")
    with pytest.raises(BadInput, match="cuda:3"):
        make_plan(load_config(write_config(tmp_path, folder, device_map={"": 3})), 2, "80GB")


def test_memory_sizes_and_bad_flags(capsys, tmp_path):
    assert parse_memory("80GB") == 80 * 10**9 and parse_memory("80GiB") == parse_memory("80G") == 80 * 2**30
    config = write_config(tmp_path, llama_folder(tmp_path, "8b"))
    for flags, message in ((["--gpu-memory", "lots"], "--gpu-memory"), (["--gpus", "0", "--gpu-memory", "8G"], "--gpus"),
                           (["--gpus", "1"], "--gpus needs --gpu-memory")):
        code, _, err = run_cli(capsys, config, *flags)
        assert code == 2 and message in err, err
    with pytest.raises(BadInput, match="max_memory needs model.device_map"):
        load_config(None, ["model.max_memory={0: 80GB}"])


def test_run_prints_the_plan_before_loading(capsys, tmp_path):
    """A config-only folder: `afprobe run` prints the plan, then fails to load weights that are not there."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    from afprobe.activations.loading import tiny_llama

    tiny_llama().config.to_json_file(folder / "config.json")
    config = write_config(tmp_path, folder)
    for quiet in ([], ["--quiet"]):
        code = main(["run", str(config), "--out", str(tmp_path / "run"), "--force", *quiet])
        out = capsys.readouterr().out
        assert code == 2
        if quiet:
            assert out == ""
        else:
            plan, loading = out.splitlines()[:2], out.splitlines()[2]
            assert plan[0].startswith("plan: ") and plan[1].startswith("plan: fits: cpu") and loading.startswith("loading")


# ---------------------------------------------------------------- the shipped large-model configs are true

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = {  # config -> the Llama shape its model has
    "llama-3.1-8b.yaml": "8b", "llama-3.3-70b.yaml": "70b", "af-organism-70b.yaml": "70b",
    "llama-3.3-70b-ndif.yaml": "70b", "llama-3.1-405b-base-ndif.yaml": "405b",
}


def _stated_gpus(text: str) -> int | None:
    """The GPU count a config's comment states ("at least 2 x 80 GB GPUs", "on one GPU"), or None (remote)."""
    import re

    found = re.search(r"at least (\d+) x 80 GB GPUs", text)
    return int(found.group(1)) if found else (1 if "on one GPU" in text else None)


def _lora_folder(tmp_path: Path) -> Path:
    """An adapter_config.json of a rank-64 LoRA on every projection (weights are not needed to plan)."""
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 64, "lora_alpha": 128,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}))
    return folder


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_agree_with_plan(capsys, tmp_path, name):
    """`afprobe plan` on each shipped real-model config, its model replaced by a folder holding only a config.json
    of the right shape: the hardware the config's comment states is what the plan says is needed."""
    path = CONFIGS_DIR / name
    text = path.read_text()
    cfg = yaml.safe_load(text)
    sets = ["--set", f"model.spec={llama_folder(tmp_path, SHIPPED[name])}"]
    if cfg["model"].get("adapter"):
        sets += ["--set", f"model.adapter={_lora_folder(tmp_path)}"]
    out_json = tmp_path / "plan.json"
    remote = cfg["model"].get("remote", "none")
    if remote == "ndif":  # no GPUs here at all: the weights live on the server
        code, out, _ = run_cli(capsys, path, *sets, "--gpus", "0", "--json", out_json)
        assert code == 0, out
        plan = json.loads(out_json.read_text())
        assert _stated_gpus(text) is None and "any CPU machine" in text
        assert plan["fits"] and "remote (NDIF)" in plan["verdict"]
        assert plan["stages"]["remote"]["prefix_reuse"] is False and plan["stages"]["remote"]["jobs"] > 0
        assert plan["stages"]["cache"]["prefix_passes"] == 0 and "do not apply remotely" in out
        weights_gb = {"70b": 141, "405b": 811}[SHIPPED[name]]
        assert abs(plan["memory"]["weights"] / 1e9 - weights_gb) < 0.01 * weights_gb
        assert f"about {weights_gb} GB" in text or SHIPPED[name] == "70b"
        return
    stated = _stated_gpus(text)
    code, out, _ = run_cli(capsys, path, *sets, "--gpus", str(stated), "--gpu-memory", "80GB", "--json", out_json)
    assert code == 0, out
    plan = json.loads(out_json.read_text())
    assert plan["placement"]["gpus_needed"] == stated
    if stated > 1:  # one fewer does not fit: exit 2
        code, _, err = run_cli(capsys, path, *sets, "--gpus", str(stated - 1), "--gpu-memory", "80GB")
        assert code == 2 and err.startswith("afprobe: error: does not fit")
    if cfg["model"].get("adapter"):
        assert plan["model"]["adapters"][0]["rank"] == 64 and plan["model"]["adapters"][0]["params"] > 0
    if SHIPPED[name] == "70b":
        assert abs(plan["memory"]["weights"] / 1e9 - 141) < 1.5 and "141 GB" in text
