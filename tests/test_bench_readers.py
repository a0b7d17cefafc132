"""benchmarks/readers.py on files in each published layout: detection, prompts, answers, bad rows."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.readers import BenchError, Skipped, bench_files, detect_format, iter_items, split_mmstar_options
from tests import bench_fixtures as fx


def items(path, **kw):
    return list(iter_items(path, **kw))


def test_layouts_are_detected_from_their_columns(tmp_path):
    assert detect_format(fx.mmstar(tmp_path / "mmstar.parquet")) == "mmstar"
    assert detect_format(fx.scienceqa(tmp_path / "ScienceQA-IMG" / "test-00000-of-00001.parquet")) == "scienceqa"
    assert detect_format(fx.pope(tmp_path / "pope" / "test-00000-of-00003.parquet")) == "pope"
    assert detect_format(fx.mmbench(tmp_path / "en" / "dev-00000-of-00001.parquet")) == "mmbench_en"
    assert detect_format(fx.mmbench(tmp_path / "zh.parquet", chinese=True)) == "mmbench_cn"  # by its text
    assert detect_format(fx.mmbench(tmp_path / "cn" / "dev.parquet")) == "mmbench_cn"  # by its folder
    (tmp_path / "pope" / ".cache").mkdir()
    (tmp_path / "pope" / ".cache" / "stale.parquet").write_bytes(b"hub bookkeeping")
    assert detect_format(tmp_path / "pope") == "pope"  # a folder of shards; hidden folders ignored
    assert [f.name for f in bench_files(tmp_path / "pope")] == ["test-00000-of-00003.parquet"]
    assert detect_format(tmp_path / "mmstar.parquet", "mmstar") == "mmstar"


def test_layout_mistakes_are_one_line_errors(tmp_path):
    odd = tmp_path / "odd.parquet"
    pq.write_table(pa.table({"question": ["q"], "label": [1]}), odd)
    with pytest.raises(BenchError, match=r"odd.parquet: its columns \(question, label\) match no benchmark layout. "
                                         r"Expected mmbench_en: .*--bench_format"):
        detect_format(odd)
    with pytest.raises(BenchError, match=r"--bench_format pope needs columns \['question_id', 'answer', 'image', "
                                         r"'category'\], which are missing \(columns found: question, label\)"):
        detect_format(odd, "pope")
    with pytest.raises(BenchError, match="file not found"):
        detect_format(tmp_path / "absent.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchError, match="no .parquet files"):
        detect_format(tmp_path / "empty")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(BenchError, match="not a readable Parquet file"):
        detect_format(tmp_path / "junk.parquet")


def test_mmstar_prompt_and_options():
    assert split_mmstar_options("What?\nOptions: A: a cat, sitting, B: two dogs, C: 3, 4, and 5, D: none") == (
        "What?", ["a cat, sitting", "two dogs", "3, 4, and 5", "none"])
    assert split_mmstar_options("Is it red? Please answer yes or no.") is None


def test_mmstar_items(tmp_path):
    path = fx.mmstar(tmp_path / "m.parquet")
    rows = pq.read_table(path).to_pylist()
    rows[5]["question"] = "Is the cat on the left? Please answer yes or no.\nOptions: A: yes, B: no"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)
    it = items(path)
    assert it[5].messages[0]["content"] == ("<image>\nIs the cat on the left?\nOptions: A: yes, B: no\n"
                                            "Answer with the option's letter from the given choices directly")
    assert len(it) == 6
    first = it[0]
    assert first.messages == [{"role": "user", "content": "<image>\nWhich one fits picture 0?\nOptions: A: a cat, "
                               "sitting, B: two dogs, C: 3, 4, and 5, D: none\nAnswer with the option's letter "
                               "from the given choices directly"}]  # lmms-eval's MMStar prompt, verbatim
    assert first.mc_messages[0]["content"] == "<image>\nWhich one fits picture 0?"
    assert first.options == ["a cat, sitting", "two dogs", "3, 4, and 5", "none"]
    assert [x.answer for x in it] == [0, 1, 2, 3, 0, 1] and it[1].reference == "B" and first.chance == 0.25
    assert it[5].options == ["yes", "no"] and it[5].chance == 0.5
    assert first.labels == {"category": "coarse perception", "l2_category": "image emotion"}
    assert first.images[0][:4] == b"\x89PNG" and first.uid == "0"


def test_scienceqa_items(tmp_path):
    it = items(fx.scienceqa(tmp_path / "s.parquet"))
    assert it[0].messages[0]["content"] == ("<image>\nContext: The map shows a place.\nQuestion 0?\nA. north\n"
                                            "B. south\nAnswer with the option's letter from the given choices directly.")
    assert it[1].messages[0]["content"] == ("<image>\nQuestion 1?\nA. yes\nB. no\nC. maybe\n"
                                            "Answer with the option's letter from the given choices directly.")
    assert it[0].mc_messages[0]["content"] == "<image>\nContext: The map shows a place.\nQuestion 0?"
    assert [(x.answer, x.reference) for x in it] == [(0, "A"), (1, "B"), (0, "A"), (1, "B")]  # int8 index
    assert it[1].chance == pytest.approx(1 / 3) and it[1].labels["subject"] == "social science"


def test_pope_items(tmp_path):
    it = items(fx.pope(tmp_path / "p.parquet"))
    assert it[0].messages[0]["content"] == ("<image>\nIs there a cat in the image?\n"
                                            "Answer the question using a single word or phrase.")
    assert it[0].options == ["Yes", "No"] and [x.answer for x in it[:2]] == [0, 1]
    assert [x.reference for x in it[:2]] == ["yes", "no"] and it[0].uid == "100"
    assert [x.labels["category"] for x in it[:3]] == ["adversarial", "popular", "random"]


def test_mmbench_items(tmp_path):
    en = items(fx.mmbench(tmp_path / "en.parquet"))
    assert en[0].messages[0]["content"] == ("<image>\nA hint. What is in the image? 0 There are several options:\n"
                                            "A. cat\nB. dog\nC. bird\nD. fish\n\n"
                                            "Answer with the option's letter from the given choices directly.")
    assert en[1].messages[0]["content"] == ("<image>\nWhat is in the image? 1 There are several options:\n"
                                            "A. cat\nB. dog\nC. bird\n\n"  # null hint and null D left out
                                            "Answer with the option's letter from the given choices directly.")
    assert en[1].options == ["cat", "dog", "bird"] and en[1].letters == ["A", "B", "C"] and en[1].answer == 1
    assert en[0].labels == {"l2_category": "coarse_perception", "category": "object_localization"}
    cn = items(fx.mmbench(tmp_path / "cn.parquet", chinese=True))
    assert cn[0].messages[0]["content"].endswith("D. fish\n\n请直接使用所提供的选项字母作为答案回答。")


def test_bad_rows_are_skipped_and_counted(tmp_path):
    path = fx.mmstar(tmp_path / "m.parquet", n=4)
    t = pq.read_table(path).to_pylist()
    t[1]["answer"] = "E"
    t[2]["image"] = {"bytes": None, "path": "elsewhere.jpg"}
    pq.write_table(pa.Table.from_pylist(t, schema=pq.read_schema(path)), path)
    skipped = Skipped()
    got = items(path, skipped=skipped)
    assert [x.uid for x in got] == ["0", "3"]
    assert skipped.count == 2 and skipped.reasons == {"answer": 1, "image": 1}
    assert skipped.examples[0] == f"{path} row 1: answer: 'E' is not one of the option letters ['A', 'B', 'C', 'D']"
    assert "row 2: image: the image struct holds no bytes (path 'elsewhere.jpg')" in skipped.examples[1]


def test_items_stream_in_small_batches(tmp_path, monkeypatch):
    """A limited read touches only the first Arrow batch: the file is never loaded whole."""
    path = fx.pope(tmp_path / "p.parquet", n=30)
    seen = []
    original = pq.ParquetFile.iter_batches

    def counting(self, *a, **kw):
        for b in original(self, *a, **kw):
            seen.append(b.num_rows)
            yield b
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    assert len(items(path, limit=3, batch_rows=4)) == 3
    assert seen == [4]


def test_qa_layout_candidates_and_chance(tmp_path):
    from scripts.make_synthetic_data import make_dataset
    paths = make_dataset(tmp_path / "syn", seed=0, n_pretrain=1, n_sft=1, n_eval=12)
    it = items(paths["eval"])
    assert len(it) == 12 and all(x.images for x in it)
    for x in it:  # a kind with a single answer in the file has no candidates to choose from
        assert not x.options or (x.options[x.answer] == x.reference and x.chance == pytest.approx(1 / len(x.options)))
        assert x.messages == x.mc_messages and x.messages[-1]["role"] == "user"
    assert sum(bool(x.options) for x in it) >= 6
