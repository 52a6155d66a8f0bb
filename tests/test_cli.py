"""Bad input: exit code 2, a one-line message naming the problem, no traceback, nothing lost."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from afprobe.cli import main

DEFAULT = str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")


def _fails(capsys, argv: list[str], *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_unknown_config_key_suggests_closest(capsys, tmp_path):
    _fails(capsys, ["cache", DEFAULT, "--out", str(tmp_path / "r"), "--set", "cache.layer=[1]"],
           "cache.layer", "did you mean 'cache.layers'")


def test_unknown_key_in_yaml_file(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("modle:\n  spec: x\n")
    _fails(capsys, ["cache", str(cfg), "--out", str(tmp_path / "r")], "modle", "did you mean 'model'")


def test_wrong_type(capsys, tmp_path):
    _fails(capsys, ["cache", DEFAULT, "--out", str(tmp_path / "r"), "--set", "probes.folds=many"], "probes.folds")


def test_missing_config_file(capsys, tmp_path):
    _fails(capsys, ["cache", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "r")], "not found")


def test_layer_out_of_range(capsys, tmp_path):
    _fails(capsys, ["cache", DEFAULT, "--out", str(tmp_path / "r"), "--set", "cache.layers=[3,40]"],
           "layer 40", "30 layers")


def test_empty_query_set(capsys, tmp_path):
    q = tmp_path / "q.txt"
    q.write_text("\n\n")
    _fails(capsys, ["cache", DEFAULT, "--out", str(tmp_path / "r"), "--set", f"queries.path={q}"], "empty")


def test_csv_without_named_column(capsys, tmp_path):
    q = tmp_path / "q.csv"
    q.write_text('goal,target\n"Do a, b and c","Sure"\n')
    _fails(capsys, ["cache", DEFAULT, "--out", str(tmp_path / "r"), "--set", f"queries.path={q}",
                    "--set", "queries.column=prompt"], "prompt", "goal")


def test_malformed_jsonl_line_number(capsys, tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text('{"text": "one"}\n{"text": "two"}\n{not json\n')
    _fails(capsys, ["cache", DEFAULT, "--out", str(tmp_path / "r"), "--set", f"queries.path={q}"], "line 3")


def test_unknown_model_spec(capsys, tmp_path):
    _fails(capsys, ["cache", DEFAULT, "--out", str(tmp_path / "r"), "--set", "model.spec=not-a-model"],
           "not-a-model")


def test_empty_alpha_grid(capsys, tmp_path):
    _fails(capsys, ["cache", DEFAULT, "--out", str(tmp_path / "r"), "--set", "steering.alphas=[]"], "alpha")


def test_output_dir_with_a_different_run_is_kept(capsys, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    manifest = {"config": {}, "config_hash": "0123456789abcdef", "stages": {"cache": {"status": "done"}}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    (run / "precious.txt").write_text("keep me")
    _fails(capsys, ["cache", DEFAULT, "--out", str(run)], "different run", "--force")
    assert json.loads((run / "manifest.json").read_text()) == manifest
    assert (run / "precious.txt").read_text() == "keep me"


def test_unknown_command(capsys):
    _fails(capsys, ["frobnicate"], "invalid choice")


def test_probe_before_cache(capsys, tmp_path):
    _fails(capsys, ["probe", str(tmp_path)], "manifest")


def test_run_name_cannot_escape(capsys, tmp_path):
    _fails(capsys, ["run", DEFAULT, "--set", "name=../../etc"], "run name")


def test_best_methods_outside_methods(capsys, tmp_path):
    _fails(capsys, ["run", DEFAULT, "--out", str(tmp_path / "r"), "--set", "probes.methods=[diff_means]",
                    "--set", "probes.best_methods=[lda]"], "best_methods")
