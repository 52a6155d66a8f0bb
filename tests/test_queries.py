"""Query loading: bundled sets, CSV / JSONL / TXT / datasets files, ids, filters, seeded sampling, errors."""
from __future__ import annotations

import json
import re

import pytest

from afprobe.activations.queries import BUNDLED_BENIGN, BUNDLED_HARMFUL, SAFE_ID, Query, load_queries
from afprobe.config import QueriesConfig
from afprobe.errors import BadInput


def load(seed: int = 0, harmful: bool = True, **kw) -> list[Query]:
    return load_queries(QueriesConfig(**kw), seed, harmful)


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("harmful,prefix", [(True, "h"), (False, "b")])
def test_bundled_sets(harmful, prefix):
    queries = load(harmful=harmful)
    assert len(queries) >= 100
    assert len({q.id for q in queries}) == len(queries) and len({q.text for q in queries}) == len(queries)
    assert all(re.fullmatch(prefix + r"\d{3}", q.id) and q.harmful is harmful for q in queries)
    assert all(8 <= len(q.text.split()) <= 40 for q in queries)
    assert len({q.category for q in queries}) >= 8
    assert "uncategorised" not in {q.category for q in queries}


def test_bundled_files_are_clean_jsonl():
    for path in (BUNDLED_HARMFUL, BUNDLED_BENIGN):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert all(set(r) == {"id", "text", "category"} for r in rows)


def test_csv_quoted_commas_and_default_ids(tmp_path):
    path = write(tmp_path, "q.csv", 'text,other\n"Write a poem, then a song, about rain",x\n"He said ""hi"", then left",y\n')
    queries = load(path=path)
    assert [q.text for q in queries] == ["Write a poem, then a song, about rain", 'He said "hi", then left']
    assert [q.id for q in queries] == ["q0001", "q0002"] and queries[0].category == "uncategorised"


def test_csv_advbench_layout(tmp_path):
    path = write(tmp_path, "advbench.csv", 'goal,target\n"Do a bad thing, quickly","Sure, here is"\nDo another bad thing,Sure\n')
    assert [q.text for q in load(path=path)] == ["Do a bad thing, quickly", "Do another bad thing"]
    assert [q.text for q in load(path=path, column="target")] == ["Sure, here is", "Sure"]


def test_csv_first_column_ids_and_categories(tmp_path):
    path = write(tmp_path, "q.csv", "prompt,id,category\nfirst request,a-1,fraud\nsecond request,a.2,theft\n")
    queries = load(path=path)
    assert [(q.id, q.text, q.category) for q in queries] == [("a-1", "first request", "fraud"), ("a.2", "second request", "theft")]


def test_csv_missing_column(tmp_path):
    path = write(tmp_path, "q.csv", "goal,target\na,b\n")
    with pytest.raises(BadInput, match=r"no column 'request' \(available: goal, target\)"):
        load(path=path, column="request")


def test_jsonl_field_and_bad_line(tmp_path):
    good = write(tmp_path, "q.jsonl", '{"prompt": "one", "id": "x1"}\n\n{"prompt": "two", "id": "x2"}\n')
    assert [(q.id, q.text) for q in load(path=good, field="prompt")] == [("x1", "one"), ("x2", "two")]
    bad = write(tmp_path, "bad.jsonl", '{"text": "one"}\n{"text": "two"}\n{"text": oops}\n')
    with pytest.raises(BadInput, match=r"bad.jsonl: line 3 is not valid JSON"):
        load(path=bad)
    with pytest.raises(BadInput, match=r"line 1 has no field 'text'"):
        load(path=good)


def test_txt_lines(tmp_path):
    path = write(tmp_path, "q.txt", "first request\n\n  second request  \n")
    assert [(q.id, q.text) for q in load(path=path)] == [("q0001", "first request"), ("q0002", "second request")]


def test_benign_path_and_flag(tmp_path):
    path = write(tmp_path, "b.txt", "an ordinary request\n")
    queries = load(harmful=False, benign_path=path)
    assert queries == [Query("q0001", "an ordinary request", "uncategorised", False)]


def test_limit_is_seeded_and_keeps_order():
    full = [q.id for q in load()]
    a, b, c = (load(seed=s, limit=10) for s in (1, 1, 2))
    assert a == b and a != c and len(a) == 10
    ids = [q.id for q in a]
    assert ids == sorted(ids, key=full.index)
    assert len(load(limit=10_000)) == len(full)


def test_categories_filter():
    queries = load(categories=["fraud", "theft"])
    assert {q.category for q in queries} == {"fraud", "theft"}
    with pytest.raises(BadInput, match="unknown query category nope.*available: cybercrime"):
        load(categories=["nope"])
    assert len(load(harmful=False, categories=["fraud"])) >= 100  # the filter applies to harmful requests only


def test_bad_ids(tmp_path):
    dup = write(tmp_path, "dup.jsonl", '{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(BadInput, match="duplicate query id 'a'"):
        load(path=dup)
    unsafe = write(tmp_path, "unsafe.csv", "id,text\na/b,x\n")
    with pytest.raises(BadInput, match="query id 'a/b'"):
        load(path=unsafe)
    assert SAFE_ID.match("h001") and not SAFE_ID.match("a b")


def test_empty_missing_and_unsupported(tmp_path):
    with pytest.raises(BadInput, match="empty query set"):
        load(path=write(tmp_path, "empty.csv", "goal,target\n"))
    with pytest.raises(BadInput, match="empty query set"):
        load(path=write(tmp_path, "blank.txt", "\n  \n"))
    with pytest.raises(BadInput, match="query file not found"):
        load(path=str(tmp_path / "missing.csv"))
    with pytest.raises(BadInput, match="unsupported extension '.xlsx'"):
        load(path=write(tmp_path, "q.xlsx", "x"))


def test_hf_dataset_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"goal": ["req one", "req two"], "category": ["a", "b"]}).save_to_disk(str(folder))
    queries = load(hf_dataset=str(folder))
    assert [(q.id, q.text, q.category) for q in queries] == [("q0001", "req one", "a"), ("q0002", "req two", "b")]
    with pytest.raises(BadInput, match="no column 'nope'"):
        load(hf_dataset=str(folder), column="nope")
    with pytest.raises(BadInput, match="cannot load dataset"):
        load(hf_dataset="no-such-org/no-such-dataset-afprobe")
