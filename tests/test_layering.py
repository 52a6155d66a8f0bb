"""The rooms stay apart: model-facing code (activations/) imports nothing from analysis/ (checked by parsing
every import, including those inside functions), and there is one model engine: only the engine's modules
build KV caches or compute tag log-probabilities."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("activations", "afprobe", "analysis", "probes")
# The shared engine: KV caches are built only here (kv.py is the name everything else imports them by) ...
CACHE_MODULES = {"activations/kv.py", "activations/hf_internals.py", "activations/batching.py", "activations/trunk.py"}
# ... and tag log-probabilities are computed only here: the steering runner and its remote (NDIF) half
LOGPROB_MODULES = {"activations/steering.py", "activations/remote_ops.py"}


def _analysis_imports(path: Path, root: Path = ROOT) -> list[str]:
    """'file:line module' for each import of afprobe.analysis (absolute or relative) in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against the file's package inside activations/
                module = "afprobe.activations." + module if node.level == 1 else "afprobe." + module
            names = [module] + [f"{module}.{a.name}" for a in node.names]
        if any(n == "afprobe.analysis" or n.startswith("afprobe.analysis.") or n.startswith("analysis.")
               for n in names):
            found.append(f"{path.relative_to(root)}:{node.lineno} {names[0]}")
    return found


def _sources() -> list[Path]:
    return [p for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]


def test_activations_import_nothing_from_analysis():
    assert [hit for p in sorted((ROOT / "activations").rglob("*.py")) for hit in _analysis_imports(p)] == []


def _uses(path: Path, name: str) -> list[int]:
    """Lines where `name` is used as a name or an attribute (torch.log_softmax, F.log_softmax, DynamicCache)."""
    return [node.lineno for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
            if (isinstance(node, ast.Name) and node.id == name) or (isinstance(node, ast.Attribute) and node.attr == name)
            or (isinstance(node, ast.ImportFrom) and any(a.name == name for a in node.names))]


@pytest.mark.parametrize("name,allowed", [("DynamicCache", CACHE_MODULES), ("log_softmax", LOGPROB_MODULES)])
def test_one_engine_builds_caches_and_scores_tags(name, allowed):
    """No second KV cache or decoder/log-odds routine: the organism, the pipeline and analysis go through
    activations/steering.py and activations/kv.py."""
    found = [f"{p.relative_to(ROOT)}:{line}" for p in _sources() for line in _uses(p, name)
             if str(p.relative_to(ROOT)) not in allowed]
    assert found == []


def test_the_engine_check_sees_a_second_cache(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from transformers import DynamicCache\nimport torch\ndef f(x):\n    return torch.log_softmax(x, -1)\n")
    assert _uses(probe, "DynamicCache") == [1] and _uses(probe, "log_softmax") == [4]


def test_the_import_check_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\ndef f():\n    from afprobe.analysis import stats\n    import afprobe.analysis.compliance\n")
    assert len(_analysis_imports(probe, tmp_path)) == 2


def test_answer_tags_agree():
    from afprobe.activations import scenario_text
    from afprobe.analysis import compliance

    assert (compliance.ACCEPT_TAG, compliance.REJECT_TAG) == (scenario_text.ACCEPT_TAG, scenario_text.REJECT_TAG)
