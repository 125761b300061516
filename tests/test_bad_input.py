"""Every bad input named in the issue "Nothing lost, every bad input a clear error", as a table:
the command line, and the one line it must answer with (or click's usage error for a bad flag).
Each case must fail before any model loads or any scoring starts where it can be checked then."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mbc import MBCError
from mbc.cli import app

runner = CliRunner()
USAGE = "Invalid value"  # click's one-line message for a flag out of its range

SQUAD = {
    "dict-data": {"data": 5},
    "number-article": {"data": [5]},
    "dict-paragraphs": {"data": [{"title": "t", "paragraphs": {"context": "c"}}]},
    "number-context": {"data": [{"title": "t", "paragraphs": [{"context": 5, "qas": []}]}]},
    "null-question": {
        "data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [{"question": None, "answers": []}]}]}]
    },
    "string-answers": {
        "data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [{"question": "q", "answers": "x"}]}]}]
    },
    "list-top": [1, 2],
    "one-article": {
        "data": [
            {
                "title": "only",
                "paragraphs": [{"context": "c d", "qas": [{"question": "q?", "answers": [{"text": "c"}]}]}],
            }
        ]
    },
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    for name, content in SQUAD.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
    (folder / "not-json.json").write_text("{not json")
    (folder / "folder.json").mkdir()
    (folder / "a-file").write_text("a file where a folder should be")
    (folder / "list-config.json").write_text("[1]")
    return folder


def _train(data="generated", *extra):
    return ["train", "--data", data, "--max-steps", "1", *extra]


CASES = [
    # data
    (lambda f: _train(str(f / "folder.json")), "is a folder"),
    (lambda f: _train(str(f / "missing.json")), "does not exist"),
    (lambda f: _train(str(f / "not-json.json")), "is not JSON"),
    (lambda f: _train(str(f / "list-top.json")), "expected an object with a 'data' list"),
    (lambda f: _train(str(f / "dict-data.json")), "'data' must be a list"),
    (lambda f: _train(str(f / "number-article.json")), "data[0]: an article must be an object"),
    (lambda f: _train(str(f / "dict-paragraphs.json")), "'paragraphs' must be a list"),
    (lambda f: _train(str(f / "number-context.json")), "paragraphs[0]: 'context' must be a string"),
    (lambda f: _train(str(f / "null-question.json")), "qas[0]: 'question' must be a string"),
    (lambda f: _train(str(f / "string-answers.json")), "'answers' must be a list"),
    (lambda f: _train("generated:abc"), "whole numbers"),
    (lambda f: ["validate", "missing-checkpoint", "--data", str(f / "one-article.json")], "split of"),
    # settings: every field checked against its type and range, named in the message
    (lambda f: _train("generated", "--set", "quantize=maybe"), "quantize must be true or false"),
    (lambda f: _train("generated", "--set", "num_slots=abc"), "num_slots must be a whole number"),
    (lambda f: _train("generated", "--set", "num_slots=2.5"), "num_slots must be a whole number"),
    (lambda f: _train("generated", "--set", "codebook_size=1073741824"), "codebook_size must be between 2 and 65536"),
    (lambda f: _train("generated", "--set", "lora_dropout=2"), "lora_dropout must be between 0 and 1"),
    (lambda f: _train("generated", "--set", "beta=-5"), "beta must be at least 0"),
    (lambda f: _train("generated", "--set", "codebook_metric=dot"), "codebook_metric must be one of"),
    (lambda f: _train("generated", "--set", "num_slots"), "overrides take KEY=VALUE"),
    (lambda f: _train("generated", "--set", "no_such=1"), "unknown setting 'no_such'"),
    (lambda f: _train("generated", "--train-set", "learning_rate=abc"), "learning_rate must be a number"),
    (lambda f: _train("generated", "--train-set", "learning_rate=nan"), "learning_rate must be a finite number"),
    (lambda f: _train("generated", "--train-set", "batch_size=0"), "batch_size must be at least 1"),
    (lambda f: _train("generated", "--train-set", "mixed_precision=foo"), "mixed_precision must be one of"),
    (lambda f: _train("generated", "--train-set", "no_such=1"), "unknown setting 'no_such'"),
    (lambda f: _train("generated", "--train-set", "warmup_ratio=2"), "warmup_ratio must be between 0 and 1"),
    (lambda f: _train("generated", "--preset", "nope"), "unknown preset 'nope'"),
    (lambda f: ["info", "--config", str(f / "missing-config.json")], "cannot read config"),
    (lambda f: ["info", "--config", str(f / "list-config.json")], "must be a JSON object"),
    # flags
    (lambda f: _train("generated", "--first-documents", "-1"), USAGE),
    (lambda f: _train("generated", "--first-documents", "0"), USAGE),
    (lambda f: ["train", "--max-steps", "0"], USAGE),
    (lambda f: ["train", "--max-minutes", "-1"], USAGE),
    (lambda f: ["validate", "ckpt", "--questions", "0"], USAGE),
    (lambda f: ["validate", "ckpt", "--questions", "-1"], USAGE),
    (lambda f: ["eval", "ckpt", "--documents", "0"], USAGE),
    (lambda f: ["eval", "ckpt", "--documents", "-1"], USAGE),
    (lambda f: ["eval", "ckpt", "--retention-every", "0"], USAGE),
    (lambda f: ["eval", "ckpt", "--bm25-top-k", "0"], USAGE),
    (lambda f: ["run", "--documents", "0"], USAGE),
    (lambda f: ["run", "--steps", "0"], USAGE),
    # checked before the checkpoint (missing here) is even looked at
    (lambda f: ["eval", "missing-checkpoint", "--decoding", "foo"], "decoding must be one of"),
    (lambda f: ["eval", "missing-checkpoint", "--methods", "mbc,foo"], "unknown method 'foo'"),
    (lambda f: ["eval", "missing-checkpoint", "--method", "mbc", "--method", "foo"], "unknown method 'foo'"),
    (lambda f: ["eval", "missing-checkpoint", "--output", str(f / "a-file")], "cannot use"),
    (lambda f: ["eval", "missing-checkpoint", "--split", "nope"], "unknown split 'nope'"),
    (lambda f: ["eval", "--methods", "mbc,mac"], "need a model that was not given"),
    (lambda f: ["eval", "--methods", "base, 3 worked examples"], "need a model that was not given"),
    (lambda f: ["eval", "--method", "base-examples"], "need a model that was not given"),
    (lambda f: ["validate", "missing-checkpoint", "--output", str(f / "a-file" / "s.json")], "cannot use"),
    (lambda f: ["validate", "missing-checkpoint"], "not an MBC checkpoint"),
    (
        lambda f: ["train-tokens", "--data", "generated:0:20", "--key-bytes", "5000", "--output", str(f / "t")],
        "retrieval_subspaces must be between 1 and 1024, got 5000",
    ),
    (
        lambda f: ["eval", "--tokens", str(f), "--token-retrieval", "embedding_weight=-1", "--method", "tokens"],
        "embedding_weight must be at least 0, got -1.0",
    ),
    (
        lambda f: ["eval", "--tokens", str(f), "--token-retrieval", "keep=3", "--method", "tokens"],
        "sets lexical_weight, embedding_weight only, not keep",
    ),
    (
        lambda f: ["eval", "--qa-tuned", str(f), "--token-retrieval", "lexical_weight=1", "--method", "qa-tuned"],
        "give the memory with --tokens",
    ),
    (
        lambda f: ["eval", "--qa-tuned", str(f), "--mbc-retrieval", "lexical_weight=1", "--method", "qa-tuned"],
        "give the memory with the checkpoint",
    ),
    (
        lambda f: ["eval", "missing-checkpoint", "--mbc-retrieval", "num_slots=3", "--method", "mbc"],
        "sets lexical_weight, retrieval_top_k only, not num_slots",
    ),
    (
        lambda f: ["eval", "missing-checkpoint", "--mbc-retrieval", "lexical_weight=1", "--method", "mbc"],
        "cannot read config missing-checkpoint",
    ),
    (
        lambda f: ["train-tokens", "--data", "generated:0:20", "--codes", "written", "--entry-bytes", "64"],
        "entry_bytes codes kept tokens",
    ),
    (lambda f: ["train-camels", "--qa-tuned", str(f), "--steps", "-3"], "steps must be at least 1"),
    (lambda f: ["train-camels", "--qa-tuned", str(f), "--learning-rate", "0"], "learning_rate must be above 0"),
]


@pytest.mark.parametrize("arguments, message", CASES)
def test_bad_input_gets_one_clear_line(files, arguments, message):
    result = runner.invoke(app, arguments(files))
    if message == USAGE:
        assert result.exit_code == 2 and USAGE in result.output, result.output
        return
    assert isinstance(result.exception, MBCError), repr(result.exception)
    text = str(result.exception)
    assert message in text and "\n" not in text, text


def test_the_command_prints_one_line_and_exits_2():
    result = subprocess.run(
        [sys.executable, "-m", "mbc.cli", "train", "--data", "no-such-file.json"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1:] == ["error: data file no-such-file.json does not exist"]
    assert "Traceback" not in result.stderr


def test_boolean_settings_read_as_booleans(files):
    from mbc.config import MBCConfig
    from mbc.settings import parse_overrides

    values = parse_overrides(MBCConfig, {}, ["quantize=False", "prefix_layers=null", "lora_alpha=16"])
    assert values == {"quantize": False, "prefix_layers": None, "lora_alpha": 16.0}
    with pytest.raises(MBCError, match="quantize must be true or false, got 'False' \\(str\\)"):
        MBCConfig(quantize="False")  # the Python API takes no strings for booleans either


# ---- the Python API: the same standard ---------------------------------------------------------


@pytest.fixture(scope="module")
def api(tiny_paths, tmp_path_factory):
    from conftest import tiny_config

    from mbc.bank import BankLayout, MemoryBank
    from mbc.model import MBCModel

    folder = tmp_path_factory.mktemp("api")
    mbc = MBCModel.build(tiny_config(tiny_paths)).eval()
    mac = MBCModel.build(tiny_config(tiny_paths, quantize=False)).eval()
    return {
        "mbc": mbc,
        "mac": mac,
        "bank": MemoryBank.open(folder / "mbc.db", BankLayout.of(mbc)),
        "mac_bank": MemoryBank.open(folder / "mac.db", BankLayout.of(mac)),
        "folder": folder,
    }


def _entries(count, value=0):
    import numpy as np

    return np.full((count, 4, 1), value)


def _config(tiny_paths, **changes):
    from conftest import tiny_config

    return lambda: tiny_config(tiny_paths, **changes)


API_CASES = [
    (lambda a, p: a["bank"].add(["x"], _entries(1, 3.7)), "code indices must be whole numbers"),
    (lambda a, p: a["bank"].add(["x"], _entries(1, -1)), "must not be negative"),
    (lambda a, p: a["bank"].add(["x"], _entries(1), [["a list"]]), "metadata must be a dict"),
    (lambda a, p: a["bank"].add([""], _entries(1)), "must not be empty"),
    (lambda a, p: a["bank"].add([5], _entries(1)), "must be strings"),
    (
        lambda a, p: a["mac_bank"].add(["x"], _entries(1, float("nan")).repeat(a["mac"].llm.layout.hidden_size, 2)),
        "NaN or infinite",
    ),
    (lambda a, p: _ingest(a, "one document, not a list"), "list of strings"),
    (lambda a, p: _ingest(a, [None]), "item 0 is NoneType"),
    (lambda a, p: _ingest(a, ["   "]), "must not be empty"),
    (lambda a, p: _ask(a, [""]), "questions must not be empty"),
    (lambda a, p: _ask(a, [None]), "questions must be strings"),
    (lambda a, p: _config(p, prompt_template="{question} {x}")(), "prompt_template may hold only"),
    (lambda a, p: _config(p, prompt_template="{question} {")(), "prompt_template may hold only"),
    (lambda a, p: _build(p, max_document_tokens=30000), "window of 256 tokens"),
    (lambda a, p: _build(p, prefix_layers=1000), "the base LLM has only 3 layers"),
    (lambda a, p: _eval(a, a["mac"], None), "the MBC model given has quantize=false"),
    (lambda a, p: _eval(a, a["mbc"], a["mbc"]), "the MAC model given has quantize=true"),
    (lambda a, p: _train_into(p, a["folder"] / "mbc.db"), "cannot use"),
]


def _ingest(api, texts):
    from mbc.memory.ingest import ingest

    return ingest(api["mbc"], api["bank"], texts)


def _ask(api, questions):
    from mbc.memory.readers import answer_from_bank, reader_for

    api["bank"].add(["stored so that the bank is not empty"], _entries(1, 2)) if not len(api["bank"]) else None
    return answer_from_bank(api["mbc"], reader_for(api["mbc"], api["bank"]), questions)


def _build(paths, **changes):
    from mbc.model import MBCModel

    return MBCModel.build(_config(paths, **changes)())


def _eval(api, mbc, mac):
    from mbc.data.generated import generate_examples
    from mbc.evaluation.online import EvalConfig, run_eval

    return run_eval(mbc, generate_examples(10)[:6], [], api["folder"] / "eval", EvalConfig(methods=["mbc"]), mac)


def _train_into(paths, output):
    from mbc.data.generated import generate_examples
    from mbc.training.trainer import TrainConfig, train

    rows = generate_examples(10)
    return train(_config(paths)(), TrainConfig(output_dir=str(output), batch_size=2, max_steps=1), rows, rows)


@pytest.mark.parametrize("call, message", API_CASES)
def test_bad_api_input_gets_one_clear_line(api, tiny_paths, call, message):
    with pytest.raises(MBCError) as error:
        call(api, tiny_paths)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_no_questions_get_no_answers(api):
    assert _ask(api, []) == []


def test_a_lexical_weight_for_a_learned_codebook_is_refused_before_the_model_loads(tmp_path):
    (tmp_path / "mbc_config.json").write_text('{"config": {"retrieval_top_k": 1}}')
    arguments = ["eval", str(tmp_path), "--mbc-retrieval", "lexical_weight=1", "--method", "mbc"]
    result = runner.invoke(app, arguments)
    assert isinstance(result.exception, MBCError), repr(result.exception)
    assert "lexical_weight matches questions against stored token ids" in str(result.exception)
