"""What the Markdown reports tell a reader: sample answers spread over people and labelled by split,
and where pretraining's validation loss was lowest."""

from llmpipe.data.sampling import spread_sample
from llmpipe.eval.qa import namesake_answers
from llmpipe.report.markdown import best_pretrain_step_note, finetune_samples


def test_samples_are_spread_over_the_split_not_the_first_person():
    assert spread_sample(list(range(400)), 4) == [0, 100, 200, 300]
    assert spread_sample([1, 2], 5) == [1, 2] and spread_sample([1, 2], 0) == []


def test_wrong_answers_are_traced_to_the_namesake_whose_fact_they_are():
    people = [{"name": "Ada Lind", "split": "heldout_people", "birth_city": "Oslo", "employer": "Acme"},
              {"name": "Ben Lind", "split": "heldout_people", "birth_city": "Lima", "employer": "Zeta"},
              {"name": "Ada Moss", "split": "heldout_people", "birth_city": "Kyoto", "employer": "Acme"},
              {"name": "Cy Ward", "split": "heldout_people", "birth_city": "Perth", "employer": "Beta"}]
    pairs = [{"person": "Ada Lind", "attribute": a} for a in ("birth_city", "birth_city", "birth_city", "birth_city",
                                                              "birth_city", "employer")]
    answers = ["Oslo", "lima.", "Kyoto", "Perth", "Rome", "Acme"]
    results = [{"answer": answer, "correct": index in (0, 5)} for index, answer in enumerate(answers)]
    assert namesake_answers(results, pairs, people) == {
        "wrong": 4, "same_last_name": 1, "same_first_name": 1, "someone_else": 1, "no_one": 1}


def test_finetune_samples_name_the_split_and_cover_several_people():
    results = [{"question": f"Q about person {i // 5}?", "expected": "A", "answer": "A\nmore", "correct": True,
                "split": "heldout_people"} for i in range(50)]
    text = finetune_samples({"heldout_people": results}, {"heldout_people": results}, count=5)
    assert "## held-out people (known from pretraining only, never in fine-tuning)" in text
    assert {f"person {p}?" in text for p in (0, 2, 4, 6, 8)} == {True}
    assert "A more" in text  # a line break inside an answer stays inside its table cell


def test_report_says_when_validation_loss_was_lowest_before_the_end():
    curve = [{"step": 100, "val_loss": 0.8}, {"step": 400, "val_loss": 0.5}, {"step": 800, "val_loss": 0.66}]
    note = best_pretrain_step_note(curve)
    assert "lowest at step 400 (0.500)" in note and "step 800, 0.660, +32%" in note
    assert "lowest at the last step" in best_pretrain_step_note(curve[:2])
