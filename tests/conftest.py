"""Shared fixtures: tiny random models of every supported family, saved as HF folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tiny_models import FAMILIES, tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def default_tokenizer_dir() -> Path:
    """The default model's folder (tokenizer files); materialised by `make install`."""
    from cqil_cli.inputs.models import default_model_dir

    return default_model_dir()


def save_tiny(family: str, folder: Path, tokenizer_dir: Path) -> Path:
    from transformers import AutoTokenizer

    tiny_model(family).save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def tiny_folder(request, tmp_path_factory, default_tokenizer_dir) -> Path:
    """A saved tiny random model of each family in turn, with the default tokenizer."""
    return save_tiny(request.param, tmp_path_factory.mktemp(request.param),
                     default_tokenizer_dir)


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory, default_tokenizer_dir) -> Path:
    """One saved tiny Llama (5 layers, GQA), for tests that need any model."""
    return save_tiny("llama-gqa", tmp_path_factory.mktemp("llama"), default_tokenizer_dir)


@pytest.fixture()
def text_file(tmp_path) -> Path:
    path = tmp_path / "user.txt"
    path.write_text(("It was the best of times, it was the worst of times, it was the age of "
                     "wisdom, it was the age of foolishness. ") * 60)
    return path


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
