"""Safety of inputs: no pickle anywhere, safe YAML, no remote code by default, names cannot escape."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from afprobe.errors import BadInput
from afprobe.fsio import inside, safe_name

ROOT = Path(__file__).resolve().parents[1]
CODE = [p for d in ("afprobe", "activations", "probes", "analysis") for p in (ROOT / d).rglob("*.py")]


def _code_lines():
    for path in CODE:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            yield path, n, line.split("#")[0]


def test_scan_finds_code():
    assert len(CODE) > 20


def test_no_pickle():
    hits = [f"{p}:{n}" for p, n, line in _code_lines() if re.search(r"\bpickle\b|\bdill\b|joblib", line)]
    assert not hits, hits


def test_torch_load_only_with_weights_only():
    hits = [f"{p}:{n}" for p, n, line in _code_lines() if "torch.load(" in line and "weights_only=True" not in line]
    assert not hits, hits


def test_yaml_safe_loading_only():
    hits = [f"{p}:{n}" for p, n, line in _code_lines()
            if re.search(r"yaml\.(load|unsafe_load|full_load)\(", line) and "SafeLoader" not in line]
    assert not hits, hits


def test_remote_code_off_unless_configured():
    hits = [f"{p}:{n}" for p, n, line in _code_lines() if re.search(r"trust_remote_code\s*=\s*True", line)]
    assert not hits, hits


def test_no_binary_weights_formats_shipped():
    shipped = [p for p in (ROOT / "activations").rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".pickle", ".pth")]
    assert not shipped, shipped


@pytest.mark.parametrize("name", ["../evil", "a/b", "/abs", "..", "", "x" * 200, "a\\b"])
def test_unsafe_names_refused(name):
    with pytest.raises(BadInput):
        safe_name(name)


def test_inside_refuses_escape(tmp_path):
    assert inside(tmp_path, "probes", "best.safetensors") == (tmp_path / "probes" / "best.safetensors").resolve()
    with pytest.raises(BadInput):
        inside(tmp_path, "..", "x")
