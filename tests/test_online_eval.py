import csv
import json

import pytest

from mbc.bank.packing import packed_size
from mbc.data import QAExample, documents
from mbc.data.generated import generate_examples
from mbc.errors import MBCError
from mbc.evaluation import online
from mbc.evaluation.baselines import fitted_context_prompt
from mbc.evaluation.online import EvalConfig, run_eval
from mbc.evaluation.report import format_table
from mbc.prompts import context_prompt


def test_eval_runs_every_method_and_writes_its_outputs(tiny_model, tmp_path):
    rows = [r for r in generate_examples(8, seed=3)][:30]  # 5 documents, 6 questions each
    unrelated = [r.document for r in generate_examples(8, seed=4)][::6]
    mbc, mac = tiny_model().eval(), tiny_model(quantize=False).eval()
    config = EvalConfig(retention_every=2, batch_size=8)
    summary = run_eval(mbc, rows, unrelated, tmp_path, config, mac)

    methods = summary["methods"]
    assert set(methods) == {
        "mbc",
        "mbc, unrelated bank",
        "mac",
        "mac, unrelated bank",
        "base, raw question",
        "base, 3 worked examples",
        "base, gold document",
        "base, BM25 top-1",
    }
    assert summary["documents"] == 5 and summary["questions"] == 30
    k, dim = mbc.config.num_slots, mbc.llm.layout.hidden_size
    assert methods["mbc"]["bytes_per_document"] == packed_size(k, mbc.config.codebook_size)
    assert methods["mac"]["bytes_per_document"] == k * dim * 4
    assert methods["base, raw question"]["bytes_per_document"] == 0
    assert methods["mbc"]["adapt_ms_per_document"] > 0 and methods["mbc"]["answer_ms_per_question"] > 0
    for name in ("mbc", "mac"):  # streamed in steps of 2: 2, 4, 5 documents
        curve = summary["retention"][name]
        assert [p["documents"] for p in curve] == [2, 4, 5]
        assert all(p["retention_percent"] is None or p["retention_percent"] >= 0 for p in curve)
    assert summary["banks"]["mbc"]["mac_equivalent_bytes"] == 5 * k * dim * 4
    assert summary["bm25_recall_percent"] == 100  # each generated question names its invented entity

    with (tmp_path / "predictions.csv").open() as f:
        records = list(csv.DictReader(f))
    assert len(records) == 8 * 30 and {r["method"] for r in records} == set(methods)
    assert json.loads((tmp_path / "summary.json").read_text())["questions"] == 30
    assert (tmp_path / "retention.png").stat().st_size > 0 and (tmp_path / "bank_size.png").stat().st_size > 0
    assert summary["files"] == ["predictions.csv", "summary.json", "retention.png", "bank_size.png"]
    assert "mbc, unrelated bank" in format_table(summary)
    by_kind = methods["mbc"]["by_answer_kind"]  # generated data: scored by answer kind too
    assert sum(s["questions"] for s in by_kind.values()) == 30 and set(by_kind) <= {"listed", "number", "name"}
    listed = by_kind["listed"]["questions"]
    assert abs(methods["mbc"]["em"] * 30 - sum(s["em"] * s["questions"] for s in by_kind.values())) < 1e-6
    assert f"listed ({listed})" in format_table(summary)

    again = run_eval(mbc, rows, unrelated, tmp_path, EvalConfig(retention_every=2, batch_size=8, methods=["mbc"]))
    assert again["methods"]["mbc"] == {
        **methods["mbc"],
        **{k: again["methods"]["mbc"][k] for k in ("adapt_ms_per_document", "answer_ms_per_question", "adapt_peak_mb")},
    }


def test_a_stream_of_one_step_has_one_retention_point_and_no_retention_plot(tiny_model, tmp_path):
    rows = generate_examples(8, seed=3)[:12]  # 2 documents, streamed in one step
    summary = run_eval(tiny_model().eval(), rows, [], tmp_path, EvalConfig(retention_every=2, methods=["mbc"]))
    assert [p["documents"] for p in summary["retention"]["mbc"]] == [2]
    assert not (tmp_path / "retention.png").exists() and not (tmp_path / "bank_size.png").exists()
    assert summary["files"] == ["predictions.csv", "summary.json"]


def test_prompts_about_one_document_are_answered_in_batches_of_their_own(monkeypatch):
    batches = []

    def answer(model, prompts, decoding):
        batches.append(prompts)
        return [p.upper() for p in prompts]

    monkeypatch.setattr(online, "answer_prompts", answer)
    answers = online._PromptAnswers(llm=None, decoding=None)
    prompts = ["a1", "a2", "b1", "a3", "b2", "a1"]
    predictions, _ = answers(prompts, "gold", batch_size=2, groups=["A", "A", "B", "A", "B", "A"])
    assert predictions == [p.upper() for p in prompts]
    assert batches == [["a1", "a2"], ["a3"], ["b1", "b2"]]  # each prompt once, one document per batch
    answers(["c1", "c2", "c3", "b1"], "few-shot", batch_size=2)  # no groups: in order; b1 answered already
    assert batches[3:] == [["c1", "c2"], ["c3"]]


def test_eval_with_retrieval_keys_counts_their_bytes_and_reports_recall(tiny_model, tmp_path):
    rows = generate_examples(8, seed=3)
    keys = dict(retrieval_top_k=1, retrieval_subspaces=4, retrieval_codes=4)
    mbc, mac = tiny_model(**keys), tiny_model(quantize=False, **keys)
    for model in (mbc, mac):
        model.retrieval_keys.fit([r.document for r in rows][::6])
        model.eval()
    summary = run_eval(
        mbc,
        rows[:30],
        [r.document for r in generate_examples(8, seed=4)][::6],
        tmp_path,
        EvalConfig(
            retention_every=5, batch_size=8, methods=["mbc", "mac", "mbc, unrelated bank", "mac, unrelated bank"]
        ),
        mac,
    )
    k, dim = mbc.config.num_slots, mbc.llm.layout.hidden_size
    assert (
        summary["methods"]["mbc"]["bytes_per_document"] == packed_size(k, mbc.config.codebook_size) + 1
    )  # 4 keys x 2 bits
    assert summary["methods"]["mac"]["bytes_per_document"] == k * dim * 4 + 1
    # MAC's control: the MAC model itself, reading a bank of its own (a float bank, not MBC's codes)
    assert summary["methods"]["mac, unrelated bank"]["bytes_per_document"] == k * dim * 4 + 1
    assert (tmp_path / "banks" / "mac-unrelated.db").exists()
    for name in ("mbc", "mac"):
        assert 0 <= summary["banks"][name]["retrieval_recall_percent"] <= 100
        assert summary["banks"][name]["key_bytes"] == 5


def test_eval_deletes_nothing_in_its_output_folder(tiny_model, tmp_path):
    rows = list(generate_examples(8, seed=3))[:12]
    banks = tmp_path / "banks"
    banks.mkdir()
    (banks / "mbc.db.bak").write_bytes(b"a user's backup")
    mbc = tiny_model().eval()
    config = EvalConfig(retention_every=2, batch_size=8, methods=["mbc"])
    first = run_eval(mbc, rows, [], tmp_path, config)
    before = (banks / "mbc.db").read_bytes()
    second = run_eval(mbc, rows, [], tmp_path, config)  # an earlier evaluation's bank stays too
    assert (banks / "mbc.db.bak").read_bytes() == b"a user's backup"
    assert (banks / "mbc.db").read_bytes() == before
    assert (first["banks"]["mbc"]["path"], second["banks"]["mbc"]["path"]) == (
        str(banks / "mbc.db"),
        str(banks / "mbc-2.db"),
    )
    assert second["methods"]["mbc"]["em"] == first["methods"]["mbc"]["em"]


def test_long_documents_are_cut_to_the_llm_window_and_reported(tiny_model, tmp_path):
    rows = generate_examples(8, seed=3)[:6]  # one document's questions
    long = [QAExample(r.document + " filler" * 40_000, r.question, r.answers, r.group) for r in rows]
    mbc = tiny_model().eval()
    config = EvalConfig(batch_size=8, methods=["base, gold document", "base, BM25 top-k"])
    summary = run_eval(mbc, long, [], tmp_path, config)
    assert summary["prompts_cut_to_fit"] == {"base, gold document": 6, "base, BM25 top-1": 6}
    prompt, cut = fitted_context_prompt(mbc.llm, "the key is blue. " * 100, "What colour is the key?", 1000)
    assert cut and len(mbc.llm.tokenizer(prompt)["input_ids"]) <= 1000
    assert prompt.startswith("Context: the key is blue.") and prompt.endswith(
        "Question: What colour is the key?\nAnswer:"
    )
    assert fitted_context_prompt(mbc.llm, "the key is blue.", "What colour is the key?", 1000) == (
        context_prompt("the key is blue.", "What colour is the key?"),
        False,
    )


def test_a_prompt_is_answered_once_however_many_methods_put_it(tiny_model, tmp_path, monkeypatch):
    from mbc.evaluation import online

    rows = list(generate_examples(8, seed=3))[:12]
    asked = []
    answer = online.answer_prompts
    monkeypatch.setattr(
        online,
        "answer_prompts",
        lambda model, prompts, decoding: asked.extend(prompts) or answer(model, prompts, decoding),
    )
    methods = ["base, gold document", "base, BM25 top-k"]
    summary = run_eval(tiny_model().eval(), rows, [], tmp_path, EvalConfig(batch_size=5, methods=methods))
    assert summary["bm25_recall_percent"] == 100  # so every BM25 prompt is its gold-document prompt
    assert len(asked) == len(set(asked)) == len({r.question for r in rows})
    gold, bm25 = summary["methods"]["base, gold document"], summary["methods"]["base, BM25 top-1"]
    assert gold == bm25  # the same answers, and each charged what its prompts took
    with (tmp_path / "predictions.csv").open() as f:
        by_method = {}
        for record in csv.DictReader(f):
            by_method.setdefault(record["method"], []).append(record["prediction"])
    assert by_method["base, gold document"] == by_method["base, BM25 top-1"]


def test_memory_on_top_of_bm25_reads_the_mbc_bank_with_the_document_in_the_prompt(tiny_model, tmp_path, monkeypatch):
    rows = list(generate_examples(8, seed=3))[:12]
    mbc = tiny_model(retrieval_top_k=1, retrieval_subspaces=4, retrieval_codes=2).eval()
    mbc.retrieval_keys.fit(documents(rows))
    calls = []
    generate = mbc.llm.generate
    monkeypatch.setattr(
        mbc.llm,
        "generate",
        lambda prompts, prefix=None, decoding=None: (
            calls.append((prompts, prefix)) or generate(prompts, prefix, decoding)
        ),
    )
    config = EvalConfig(batch_size=8, methods=["mbc", "mbc + BM25 top-k"])
    summary = run_eval(mbc, rows, [], tmp_path, config)
    both = summary["methods"]["mbc + BM25 top-1"]
    assert both["bytes_per_document"] > summary["methods"]["mbc"]["bytes_per_document"]  # the codes and the text
    with_context = [(p, prefix) for p, prefix in calls if mbc.llm.tokenizer.decode(p[0]).startswith("Context:")]
    assert sum(len(p) for p, _ in with_context) == len(rows) and all(prefix is not None for _, prefix in with_context)
    with pytest.raises(MBCError, match="reads the bank the method 'mbc' streams"):
        EvalConfig(methods=["mbc + BM25 top-k"])


def test_the_methods_are_named_by_key_or_name_and_the_help_lists_every_key():
    from mbc.cli import METHOD_KEYS
    from mbc.evaluation.online import METHODS, EvalConfig, method_named

    assert METHOD_KEYS == tuple(m.key for m in METHODS)
    assert EvalConfig(methods=["mbc-unrelated", "base, gold document"]).methods == [
        "mbc, unrelated bank",
        "base, gold document",
    ]
    assert [method_named(m.key) for m in METHODS] == [method_named(m.name) for m in METHODS]


def test_eval_on_postgres_banks_answers_as_on_files(tiny_model, tmp_path, postgres_server):
    rows = list(generate_examples(8, seed=3))[:12]
    unrelated = [r.document for r in generate_examples(8, seed=4)][::6]
    mbc = tiny_model(retrieval_top_k=1, retrieval_subspaces=4, retrieval_codes=2).eval()
    mbc.retrieval_keys.fit(documents(rows))
    config = EvalConfig(batch_size=8, methods=["mbc", "mbc, unrelated bank", "mbc + BM25 top-k"])
    on_files = run_eval(mbc, rows, unrelated, tmp_path / "files", config)
    url = f"{postgres_server.url}?bank=eval"
    on_server = run_eval(mbc, rows, unrelated, tmp_path / "server", config, banks=url)
    for name, scores in on_files["methods"].items():
        assert {k: on_server["methods"][name][k] for k in ("em", "f1", "bytes_per_document")} == {
            k: scores[k] for k in ("em", "f1", "bytes_per_document")
        }
    assert on_server["banks"]["mbc"]["path"].endswith("?bank=eval_mbc") and ":***@" in on_server["banks"]["mbc"]["path"]
    again = run_eval(mbc, rows, unrelated, tmp_path / "again", EvalConfig(batch_size=8, methods=["mbc"]), banks=url)
    assert again["banks"]["mbc"]["path"].endswith("?bank=eval_mbc_2")  # a new bank: nothing is overwritten
