import json
from pathlib import Path

import pytest

from mbc import MBCError
from mbc.data import QAExample, documents, first_documents, load, split_by_group, standard_split
from mbc.data.generated import ORGANISATION_KINDS, answer_kind, answer_kinds, generate_examples
from mbc.data.loaders import load_archivalqa, load_squad, load_streamingqa
from mbc.evaluation.metrics import exact_match, f1_score, lenient_exact_match, normalize, score, score_by_group

FIXTURES = Path(__file__).parent / "fixtures"
SQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad" / "squad-v1.1-dev-open.json"


def _squad_file(tmp_path, context="Paris is the capital of France.", answer="Paris", question="What is the capital?"):
    data = {
        "version": "1.1",
        "data": [
            {
                "title": "France",
                "paragraphs": [
                    {
                        "context": context,
                        "qas": [{"id": "q1", "question": question, "answers": [{"text": answer, "answer_start": 0}]}],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data))
    return path


def test_squad_loader(tmp_path):
    rows = load(str(_squad_file(tmp_path)))
    assert len(rows) == 1 and rows[0].answers == ("Paris",) and rows[0].group == "France"


@pytest.mark.skipif(not SQUAD.exists(), reason="the shared SQuAD open subset is not beside this checkout")
def test_shared_squad_open_subset_and_article_split():
    rows = load_squad(SQUAD)
    assert len(rows) == 7793 and len(documents(rows)) == 1505 and len({r.group for r in rows}) == 36
    splits = standard_split(rows)
    groups = {name: {r.group for r in part} for name, part in splits.items()}
    assert (
        not (groups["train"] & groups["validation"])
        and not (groups["train"] & groups["test"])
        and not (groups["validation"] & groups["test"])
    )
    assert sum(len(p) for p in splits.values()) == 7793


def test_streamingqa_and_archivalqa_loaders():
    streaming = load(str(FIXTURES / "streamingqa.csv"))
    assert [r.answers for r in streaming][0] == ("2019", "in 2019")
    assert streaming[0].group == streaming[1].group != streaming[2].group  # grouped by document
    archival = load(str(FIXTURES / "archivalqa.csv"))
    assert archival[0].document.startswith("The Haddon committee") and archival[0].group == "doc-17"
    assert (
        load_streamingqa(FIXTURES / "streamingqa.csv") == streaming
        and load_archivalqa(FIXTURES / "archivalqa.csv") == archival
    )


def test_first_documents_keeps_all_their_questions():
    rows = load(str(FIXTURES / "streamingqa.csv"))
    kept = first_documents(rows, 1)
    assert len(kept) == 2 and len(documents(kept)) == 1


def test_bad_input_names_file_and_row(tmp_path):
    with pytest.raises(MBCError, match="does not exist"):
        load(str(tmp_path / "missing.json"))
    bad_columns = tmp_path / "bad.csv"
    bad_columns.write_text("text,query,answers\na,b,c\n")
    with pytest.raises(MBCError, match=r"missing columns \['question'\]"):
        load(str(bad_columns))
    empty_answer = tmp_path / "empty.csv"
    empty_answer.write_text("text,question,answers\nsome text,a question?,\n")
    with pytest.raises(MBCError, match=r"empty.csv:row 2: an answer is missing or empty"):
        load(str(empty_answer))
    with pytest.raises(
        MBCError, match=r"squad.json:data\[0\]\.paragraphs\[0\]\.qas\[0\]: the document \(context\) is empty"
    ):
        load(str(_squad_file(tmp_path, context="  ")))
    with pytest.raises(MBCError, match="more than the limit of 1000"):
        load(str(_squad_file(tmp_path, question="why? " * 300)))
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("text,question,answers\ncaf\xe9,q?,a\n".encode("latin-1"))
    with pytest.raises(MBCError, match=r"latin1.csv: line 2 .* not valid UTF-8"):
        load(str(latin1))
    with pytest.raises(MBCError, match="not SQuAD"):
        (tmp_path / "x.json").write_text("[1, 2]")
        load(str(tmp_path / "x.json"))


def test_generated_data_is_seeded_and_splits_share_no_entity():
    rows = generate_examples(90, seed=3)
    assert rows == generate_examples(90, seed=3) and rows != generate_examples(90, seed=4)
    assert len(documents(rows)) == 90 and all(r.answers[0] for r in rows)
    splits = split_by_group(rows, {"train": 0.5, "test": 0.5}, seed=0)

    def entities(part):  # the capitalised words, less the templates' own
        return {w.strip(".,?") for r in part for w in r.document.split() if w[0].isupper()} - {
            "The",
            "Its",
            "It",
            *ORGANISATION_KINDS,
        }

    assert not entities(splits["train"]) & entities(splits["test"])


def test_generated_spec_takes_a_seed_and_a_document_count():
    assert len(documents(load("generated:2:30"))) == 30
    assert load("generated:2:30") == generate_examples(30, 2)
    assert len(documents(load("generated"))) == 1200
    for bad in ("generated:x", "generated:1:5", "generated:1:20:3"):
        with pytest.raises(MBCError, match="generated"):
            load(bad)


def test_squad_metrics():
    assert normalize("The  Eiffel-Tower!") == "eiffeltower"
    assert exact_match("the Eiffel Tower", ["Eiffel Tower", "tower"]) == 1.0
    assert f1_score("Eiffel Tower in Paris", ["Eiffel Tower"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert lenient_exact_match("1987 in the north", ["1987", "in 1987"]) == 1.0
    assert exact_match("1987 in the north", ["1987"]) == 0.0
    assert score(["a", "b"], [["a"], ["c"]])["em"] == 50.0


def test_answer_kinds_of_generated_data():
    rows = generate_examples(3, seed=0)  # one document of each kind: person, town, organisation
    assert [answer_kind(r.answers[0]) for r in rows[:6]] == ["number", "name", "listed", "name", "listed", "listed"]
    assert answer_kind("the central hills") == "listed" and answer_kind("the Daithlox Guild") == "name"
    assert answer_kinds(rows) == [answer_kind(r.answers[0]) for r in rows]
    other = QAExample("Paris is in France.", "Where is Paris?", ("France",), "a", "squad.json:1")
    assert answer_kinds(rows + [other]) is None and answer_kinds([]) is None


def test_scores_by_group():
    by_group = score_by_group(["red", "blue", "cat"], [["red"], ["x"], ["cat"]], ["one", "two", "one"])
    assert by_group == {
        "one": {"questions": 2, "em": 100.0, "f1": 100.0, "lenient_em": 100.0},
        "two": {"questions": 1, "em": 0.0, "f1": 0.0, "lenient_em": 0.0},
    }
