"""The console: one line per loaded model, third-party load reports only when verbose, log lines above the bar."""

from __future__ import annotations

import logging
import warnings

import pytest

from mmdist import console
from mmdist.models.text import TextConfig, TextEncoder

TINY_BERT = {
    "model_type": "bert",
    "vocab_size": 64,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 32,
}


@pytest.fixture
def configured():
    """console.configure for one test; the root logger, warnings capture and the verbose switch are put back after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield console.configure
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)
    console._verbose = None


@pytest.fixture(scope="module")
def bert_with_pooler(tmp_path_factory):
    """A saved tiny BERT with its pooler: the text encoder loads it without the pooler, as it does all-MiniLM-L6-v2."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("bert")
    params = {k: v for k, v in TINY_BERT.items() if k != "model_type"}
    BertModel(BertConfig(**params)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("verbose", [False, True])
def test_model_load_logs_one_line_and_the_load_report_only_when_verbose(
    bert_with_pooler, configured, capfd, monkeypatch, verbose
):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    configured(verbose=verbose)
    encoder = TextEncoder(TextConfig(name_or_path=str(bert_with_pooler), tokenizer="mmdist:tiny-wordpiece"))
    assert not any(n.startswith("pooler.") for n, _ in encoder.model.named_parameters())
    out = capfd.readouterr()
    text = out.out + out.err
    lines = [
        line for line in text.splitlines() if line.startswith("loaded text encoder") or " loaded text encoder" in line
    ]
    assert len(lines) == 1, text
    assert "BertModel" in lines[0] and "float32" in lines[0] and "cpu" in lines[0] and "parameters" in lines[0]
    assert "2 checkpoint weights unused (pooler.dense)" in lines[0] and "not by BERT's pooler" in lines[0]
    assert ("LOAD REPORT" in text) == verbose
    assert ("UNEXPECTED" in text) == verbose
    assert ("Loading weights" in text) == verbose  # transformers' bar


def test_the_environment_variable_makes_the_console_verbose(configured, monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    configured()
    assert console.is_verbose()
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    configured()
    assert not console.is_verbose()
    configured(verbose=True)  # the --verbose flag wins over the environment
    assert console.is_verbose()


def test_warnings_and_log_lines_go_above_an_open_progress_bar(configured, capfd, monkeypatch):
    from tqdm import tqdm

    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    configured(verbose=False)
    written = []
    monkeypatch.setattr(tqdm, "write", classmethod(lambda cls, s, file=None, end="\n", nolock=False: written.append(s)))
    with tqdm(total=3, file=None, disable=True):
        logging.getLogger("mmdist.data.reader").warning("shard x.tar: sample 7 skipped (bad image)")
        warnings.warn("something deprecated", UserWarning, stacklevel=1)
    assert any("sample 7 skipped" in s for s in written)
    assert any("something deprecated" in s for s in written)
    assert "sample 7 skipped" not in capfd.readouterr().err  # nothing went around tqdm.write
