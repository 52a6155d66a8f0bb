"""`afprobe bench` end to end on a tiny configuration: every figure present and finite, paths equal.

The model is the tiny random Llama (4 layers, d_model 64) saved as a local HF folder with the embedded
tokenizer, so the ~1650-token prompts of the default scenario stay cheap; no assertions on speed.
"""
from __future__ import annotations

import json
import math

import pytest

from afprobe.bench import FIGURES, run_bench

REQUIRED = ("cache_vs_hf", "prefix_speedup", "steer_vs_generate", "steer_prefix_speedup", "rss_growth_mb",
            "computed_token_fraction", "probe_sweep_speedup", "probe_max_auroc_diff", "trunk_speedup",
            "prefix_limit_fraction")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smol_tokenizer):
    from afprobe.activations.loading import tiny_llama

    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(seed=0).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


def test_bench_writes_every_figure(tiny_folder, tmp_path, capsys):
    out = tmp_path / "bench.json"
    overrides = [f"model.spec={tiny_folder}", "bench.n_prompts=4", "bench.n_generate=2", "bench.rss_n=2",
                 "queries.limit=4", "cache.layers=[0,1]", "bench.sweep_queries=20", "bench.sweep_ref_keys=2",
                 "bench.trunk_layer=1"]
    returned = run_bench(None, overrides, str(out), quiet=True)
    data = json.loads(out.read_text())
    for key in REQUIRED + ("max_abs_diff",):
        assert isinstance(data[key], float) and math.isfinite(data[key]), key
        assert data[key] == returned[key]
    assert data["max_abs_diff"] < 1e-3
    assert 0 < data["computed_token_fraction"] < 1
    assert set(FIGURES) <= set(data["details"]) | {"computed_token_fraction", "max_abs_diff"}
    d = data["details"]
    assert d["cache_vs_hf"]["n_prompts"] == 4 and d["steer_vs_generate"]["n_prompts"] == 2
    assert d["rss_growth_mb"]["small"]["n_prompts"] == 2 and d["rss_growth_mb"]["large"]["n_prompts"] == 20
    assert d["steer_prefix_speedup"]["reuse_computed_tokens"] < d["steer_prefix_speedup"]["reuse_total_tokens"]
    assert data["machine"]["usable_cores"] >= 1 and data["backend"] == "nnsight"
    assert data["prompts"]["n_cache"] == 4 and data["notes"]
    ps = d["probe_sweep_speedup"]  # synthetic features shaped like the cache: 2 layers x 3 positions, d 64
    assert ps["n_keys"] == 6 and ps["n_keys_sklearn_loop"] == 2 and ps["n_rows"] == 20 * 3 * 2
    assert ps["shape"]["d"] == 64 and ps["shape"]["methods"] == ["diff_means", "logreg", "lda"]
    assert ps["sweep_s"] > 0 and ps["sklearn_loop_s_measured"] > 0
    assert data["probe_max_auroc_diff"] < 0.01
    pm = d["probe_max_auroc_diff"]  # 2 keys x 3 methods x (main, shuffled, random, control, 3 x 3 families)
    assert pm["n_compared"] == 2 * 3 * 13
    assert {k: v["n"] for k, v in pm["per_kind"].items()} == {"main": 6, "shuffled": 6, "random": 6, "control": 6,
                                                              "family": 54}
    assert 0 < ps["main_only"]["sklearn_loop_s_measured"] < ps["sklearn_loop_s_measured"]
    pl = d["prefix_limit_fraction"]  # counting attention to the prefix, the limit is below the token-count one
    fc = pl["flop_count"]
    assert 1 < fc["flop_limit"] < pl["token_count_limit"] and fc["reuse_gflop"] < fc["no_reuse_gflop"]
    assert fc["fraction_reached"] == pytest.approx(data["prefix_speedup"] / fc["flop_limit"])
    from afprobe.activations.loading import tiny_llama

    cached_blocks = tiny_llama(seed=0).model.layers[:2]  # cache.layers=[0,1]: the caching path stops after block 1
    assert fc["linear_flops_per_token"] == 2 * sum(p.numel() for p in cached_blocks.parameters())
    tr = d["trunk_speedup"]  # same outputs with and without the shared trunk
    assert tr["n_conditions"] == 7 and tr["max_logodds_diff"] < 1e-5 and tr["same_text_fraction"] == 1.0
    assert tr["layer"] == 1 and tr["trunk_blocks"] == 2  # resid_post at 1: blocks 0 and 1 are shared
    assert tr["prompt_pass_block_tokens"]["shared"] < tr["prompt_pass_block_tokens"]["unshared"]
    assert data["prefix_limit_fraction"] == data["prefix_speedup"] * data["computed_token_fraction"]
    table = capsys.readouterr().out
    assert "cache_vs_hf" in table and "probe_sweep_speedup" in table and "probe_max_auroc_diff" in table


def test_bench_refuses_a_trunk_layer_the_model_lacks(tiny_folder):
    from afprobe.errors import BadInput

    with pytest.raises(BadInput, match="bench.trunk_layer 9"):
        run_bench(None, [f"model.spec={tiny_folder}", "queries.limit=4", "bench.sweep_queries=20",
                         "bench.trunk_layer=9"], None, quiet=True)
