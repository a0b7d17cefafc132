"""benchmarks/extract.py and report.py: the answer rules, POPE's metrics, the headlines, chance."""
import pytest

from benchmarks.extract import judge, mcq_letter, mmbench_letter, pope_answer, scienceqa_letter
from benchmarks.report import headline, pope_metrics


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("(C)", "C"), ("The answer is D.", "D"), ("A. a cat", "A"), ("I think it is B", "B"),
    ("b", ""), ("", ""), ("Answer: C", "C"), ("The correct answer is (A) because", "A"), ("no letter here", ""),
])
def test_mcq_letter(text, letter):
    assert mcq_letter(text, "ABCD") == letter


@pytest.mark.parametrize("text, letter", [("B", "B"), ("b", "B"), ("B. dog", "B"), ("The answer is B", ""),
                                          ("b. dog", "")])
def test_scienceqa_letter(text, letter):
    assert scienceqa_letter(text, ["A", "B", "C"]) == letter


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("(B) dog", "B"), ("It is a dog", "B"),  # the only option text in the answer
    ("a cat or a dog", ""),  # two option texts and no capital letter: no answer
    ("A cat or a dog, I say B", "A"),  # two option texts: the extractor decides (a leading letter first)
    ("C.", "C"),
])
def test_mmbench_letter(text, letter):
    assert mmbench_letter(text, ["A", "B", "C"], ["cat", "dog", "bird"]) == letter


@pytest.mark.parametrize("text, answer", [("Yes", "yes"), ("No.", "no"), ("Yes, there is a dog.", "yes"),
                                          ("There is not a dog", "no"), ("no", "no"), ("Maybe", "yes"),
                                          ("Yes. No dog though.", "yes"), ("No, there isn't", "no")])
def test_pope_answer(text, answer):
    assert pope_answer(text) == answer


def test_judge_dispatches_by_format():
    assert judge("mmstar", "The answer is C", "C", list("ABCD"), []) == ("C", True)
    assert judge("pope", "No, it is not", "yes", [], ["Yes", "No"]) == ("no", False)
    assert judge("qa", "It is red", "red", [], [], {"red", "blue"}) == ("It is red", True)
    assert judge("qa", "red or blue", "red", [], [], {"red", "blue"})[1] is False


def test_pope_metrics_on_a_hand_checked_confusion_matrix():
    # 10 questions: 6 with the object (yes), 4 without. The model says yes to 4 of the 6 and to 1 of the 4.
    refs = ["yes"] * 6 + ["no"] * 4
    preds = ["yes", "yes", "yes", "yes", "no", "no", "yes", "no", "no", "no"]
    m = pope_metrics(preds, refs)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (4, 2, 1, 3)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx(4 / 5)
    assert m["recall"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * 0.8 * (2 / 3) / (0.8 + 2 / 3))  # 0.7273
    assert m["yes_ratio"] == pytest.approx(5 / 10)  # the model's yes answers, not the references'
    none = pope_metrics(["no"] * 4, ["yes", "no", "no", "no"])
    assert none["precision"] == 0.0 and none["f1"] == 0.0 and none["yes_ratio"] == 0.0


def test_headlines():
    recs = [{"uid": str(i), "labels": {"l2_category": c}} for i, c in enumerate("aaab")]
    right = [1.0, 1.0, 0.0, 0.0]
    assert headline("mmstar", recs, right) == pytest.approx((2 / 3 + 0) / 2)  # mean over l2 categories
    assert headline("scienceqa", recs, right) == pytest.approx(0.5)  # mean over items
    circ = [{"uid": "7", "labels": {}}, {"uid": "1000007", "labels": {}}, {"uid": "8", "labels": {}}]
    assert headline("mmbench_en", circ, [1.0, 0.0, 1.0]) == pytest.approx(0.5)  # 7 fails on its copy
    assert headline("mmbench_en", circ, [0.25, 0.25, 0.5]) == pytest.approx((1 / 16 + 0.5) / 2)  # chance


def test_mmstar_summary_follows_lmms_eval():
    from benchmarks.report import summarize
    # l2 "a" (category X): 2 of 3 right; l2 "b" (X): 0 of 1; l2 "c" (Y): 1 of 1
    cases = [("a", "X", True), ("a", "X", True), ("a", "X", False), ("b", "X", False), ("c", "Y", True)]
    recs = [{"uid": str(i), "labels": {"l2_category": l2, "category": cat}, "chance": 0.25, "reference": "A",
             "images": {"generate": {"answer": "A" if ok else "B", "correct": ok}}}
            for i, (l2, cat, ok) in enumerate(cases)]
    s = summarize("mmstar", recs, "l2_category", ("images",), ("generate",))
    e = s["generate/images"]
    assert e["headline"] == pytest.approx((2 / 3 + 0 + 1) / 3) and e["item_mean"] == pytest.approx(3 / 5)
    assert e["category_l2_mean"] == pytest.approx({"X": (2 / 3 + 0) / 2, "Y": 1.0})
    assert e["per_label"]["category"]["X"] == {"n": 4, "correct": 2, "accuracy": 0.5}  # the plain item mean
    assert s["chance"]["headline"] == 0.25 and "generate/blank" not in s
