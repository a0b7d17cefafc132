"""benchmarks/scoring.py and run.py on a tiny random model: batched log-likelihood against a slow
per-option loop, the blank-image baseline, and the report of a whole run."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from benchmarks.readers import iter_items
from benchmarks.run import evaluate
from benchmarks.scoring import encode, generate_chunk, loglik_chunk
from model.chat import open_image
from model.load import load_model
from model.processor import MiniMindVLMProcessor
from tests import bench_fixtures as fx
from tests.infer_helpers import model_args, png_bytes, tiny_weights

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_clip):
    save_dir = tmp_path_factory.mktemp("weights")
    tiny_weights(save_dir)
    return load_model(model_args(save_dir, tiny_clip))


def reference_logprobs(model, processor, item, images):
    """One forward pass per option, full logits, a Python loop over the option's tokens."""
    tokenizer = processor.tokenizer
    prompt = tokenizer(processor.render(item.mc_messages, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]
    pixels = torch.stack([processor.image_processor.pixels(im) for im in images])[None] if images else None
    sums, means = [], []
    for option in item.options:
        cont = tokenizer(option, add_special_tokens=False)["input_ids"]
        logits = model(input_ids=torch.tensor([prompt + cont]), pixel_values=pixels).logits[0]
        logp = F.log_softmax(logits.float(), dim=-1)
        total = 0.0
        for j, tok in enumerate(cont):
            total += float(logp[len(prompt) - 1 + j, tok])
        sums.append(total)
        means.append(total / len(cont))
    return sums, means


def test_batched_loglik_matches_a_per_option_loop(tiny, tmp_path):
    from scripts.make_synthetic_data import KINDS, make_dataset
    model, tok = tiny
    processor = MiniMindVLMProcessor.from_config(model.config, tok)
    qa = make_dataset(tmp_path / "syn", seed=1, n_pretrain=1, n_sft=1, n_eval=16, eval_kinds=KINDS)["eval"]
    for path in (fx.mmstar(tmp_path / "m.parquet", n=5), qa):  # qa: some rows have two images
        items = [x for x in iter_items(path) if x.options]
        images = [[open_image(b) for b in x.images] for x in items]
        with torch.inference_mode():
            got = loglik_chunk(model, processor, items, encode(model, processor, images), max_rows=3)  # several passes
            for item, ims, g in zip(items, images, got):
                sums, means = reference_logprobs(model, processor, item, ims)
                assert g["sum"] == pytest.approx(sums, abs=5e-4)
                assert g["mean"] == pytest.approx(means, abs=5e-4)
                assert g["pick_sum"] == max(range(len(sums)), key=sums.__getitem__)
                assert g["pick_mean"] == max(range(len(means)), key=means.__getitem__)
        assert any(len(x.images) == 2 for x in items) or path != qa


def test_blank_baseline_is_the_model_on_grey_images(tiny, tmp_path):
    """The blank pass of a file scores exactly like the images pass of the same file with grey images."""
    model, tok = tiny
    coloured = fx.mmstar(tmp_path / "c.parquet", n=4)
    grey = fx.mmstar(tmp_path / "g.parquet", n=4, images=[png_bytes((128, 128, 128), (300, 224))] * 4)
    a = evaluate(model, tok, coloured, batch_size=3, show_progress=False, echo=False)
    b = evaluate(model, tok, grey, baseline=False, batch_size=3, show_progress=False, echo=False)
    for ra, rb in zip(a["items"], b["items"], strict=True):
        assert ra["blank"]["generate"] == rb["images"]["generate"]
        assert ra["blank"]["loglik"]["sum"] == pytest.approx(rb["images"]["loglik"]["sum"], abs=1e-3)
    only = evaluate(model, tok, coloured, blank_only=True, batch_size=3, show_progress=False, echo=False)
    assert [r["blank"]["generate"] for r in only["items"]] == [r["blank"]["generate"] for r in a["items"]]
    assert all("images" not in r for r in only["items"]) and only["blank_image"] is True


def test_pope_run_report(tiny, tmp_path, capsys):
    model, tok = tiny
    out = tmp_path / "r" / "pope.json"
    report = evaluate(model, tok, fx.pope(tmp_path / "pope" / "test-00000-of-00001.parquet", n=7).parent,
                      batch_size=4, out=out, show_progress=False)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"accuracy: {report['accuracy']:.4f}" and "results written to" in lines[-2]
    assert any(line.startswith("adversarial") for line in lines) and any("yes%" in line for line in lines)
    saved = json.loads(out.read_text())
    assert saved["format"] == "pope" and saved["rows"] == 7 and saved["chance"] == 0.5
    assert saved["method"] == "generate" and saved["grouped_by"] == "category"
    assert set(saved["per_kind"]) == {"adversarial", "popular", "random"}
    scores = saved["scores"]
    assert set(scores) >= {"generate/images", "generate/blank", "loglik_mean/images", "loglik_sum/blank", "chance"}
    pope = scores["loglik_mean/images"]["pope"]
    assert set(pope) == {"all", "adversarial", "popular", "random"} and pope["all"]["n"] == 7
    assert {"accuracy", "precision", "recall", "f1", "yes_ratio"} <= set(pope["all"])
    assert "strict_exact_match" in scores["generate/images"]
    item = saved["items"][0]
    assert item["reference"] == "yes" and item["labels"] == {"category": "adversarial"}
    assert set(item["images"]) == {"generate", "loglik"} and set(item["blank"]) == {"generate", "loglik"}
    assert item["images"]["generate"]["answer"] in ("yes", "no") and len(item["images"]["loglik"]["sum"]) == 2


def test_mmbench_circular_and_bad_images(tiny, tmp_path):
    model, tok = tiny
    path = fx.mmbench(tmp_path / "en.parquet", n=3, circular=True)
    rows = pq.read_table(path).to_pylist()
    rows[2]["image"] = {"bytes": b"junk", "path": "x.jpg"}
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)
    report = evaluate(model, tok, path, methods="loglik", baseline=False, batch_size=2, show_progress=False, echo=False)
    assert report["rows"] == 3 and report["skipped"]["count"] == 1
    assert report["skipped"]["examples"][0].startswith(f"{path} row 2: image: image 0 is not an image")
    assert report["method"] == "loglik_mean" and "generate/images" not in report["scores"]
    hits = {r["uid"]: r["images"]["loglik"]["correct_mean"] for r in report["items"]}
    expected = ((hits["0"] and hits["1000000"]) + hits["1"]) / 2  # row 0 counts only with its copy
    assert report["accuracy"] == pytest.approx(expected)
    assert report["chance"] == pytest.approx((1 / 4 * 1 / 4 + 1 / 3) / 2)


def test_batched_generation_matches_one_question_at_a_time(tiny_clip, tmp_path):
    tiny_weights(tmp_path, seed=3)  # a random model that says something (others mostly stop at once)
    model, tok = load_model(model_args(tmp_path, tiny_clip))
    items = list(iter_items(fx.scienceqa(tmp_path / "s.parquet", n=4)))  # prompts of different lengths
    images = [[open_image(b) for b in x.images] for x in items]
    processor = MiniMindVLMProcessor.from_config(model.config, tok)
    batched = generate_chunk(model, processor, items, images, max_new_tokens=6)
    single = [generate_chunk(model, processor, [x], [im], max_new_tokens=6)[0] for x, im in zip(items, images)]
    assert batched == single and sum(bool(x) for x in batched) >= 2


def test_a_failed_score_during_training_is_recorded_not_raised(tiny, tmp_path):
    import argparse
    from contextlib import nullcontext

    from benchmarks.training import score_record
    model, tok = tiny
    path = fx.pope(tmp_path / "p.parquet", n=2)
    rows = pq.read_table(path).to_pylist()
    for r in rows:
        r["image"] = {"bytes": b"junk", "path": "x.jpg"}
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)
    args = argparse.Namespace(eval_data=str(path), eval_limit=0, eval_method="loglik")
    rec = score_record(model, tok, args, 7, nullcontext())
    assert rec["step"] == 7 and "no row could be scored (2 skipped" in rec["eval_error"]
    assert model.training is False  # the mode it had is restored
