"""Text specs -> token samples."""

import json

import pytest
import torch

from cqil_cli.core.errors import CqilError
from cqil_cli.inputs.text import load_text, strip_gutenberg, token_samples


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_samples_are_deterministic_for_a_seed(tokenizer, text_file):
    a = token_samples(tokenizer, str(text_file), 4, 32, seed=1)
    b = token_samples(tokenizer, str(text_file), 4, 32, seed=1)
    c = token_samples(tokenizer, str(text_file), 4, 32, seed=2)
    assert a.shape == (4, 32) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_windows_do_not_overlap_and_come_from_the_text(tokenizer, text_file):
    samples = token_samples(tokenizer, str(text_file), 6, 16, seed=0)
    stream = tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"]
    starts = []
    for row in samples.tolist():
        hits = [i for i in range(0, len(stream) - 15, 16) if stream[i:i + 16] == row]
        assert hits, "a sample is not a window of the text"
        starts.append(hits[0])
    assert len(set(starts)) == len(starts)


def test_too_little_text_says_how_much_there_was(tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("Too short to calibrate on.")
    with pytest.raises(CqilError, match=r"too little text .* tokens .* 8 samples need 2,048 tokens"):
        token_samples(tokenizer, str(path), 8, 256)


def test_jsonl_parquet_and_folder(tmp_path):
    rows = [{"text": f"document number {i}"} for i in range(3)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert load_text(str(tmp_path / "a.jsonl")).documents == tuple(r["text"] for r in rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["x y", "z"]}), tmp_path / "b.parquet")
    assert load_text(str(tmp_path / "b.parquet")).documents == ("x y", "z")
    assert len(load_text(str(tmp_path)).documents) == 5
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(CqilError, match="no text field"):
        load_text(str(tmp_path / "bad.jsonl"))


def test_unknown_spec_is_a_clear_error():
    with pytest.raises(CqilError, match="text not found"):
        load_text("no-such-recipe-or-file")
    with pytest.raises(CqilError, match="has no split"):
        load_text("default:nosuchsplit")


def test_gutenberg_headers_are_stripped():
    raw = ("Header junk\n*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nTo be.\n"
           "<<THIS ELECTRONIC VERSION IS COPYRIGHT>>\nOr not.\n"
           "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nLicence text")
    assert strip_gutenberg(raw) == "To be.\n\nOr not."


def test_default_splits_are_disjoint():
    calibration = set(load_text("default").documents)
    heldout = set(load_text("default:heldout").documents)
    ood = load_text("default:ood")
    assert len(heldout) == 6 and len(calibration) > 30
    assert not calibration & heldout
    assert "Encyclopaedia" in ood.documents[0] or "Britannica" in ood.documents[0]
    assert all("Project Gutenberg" not in d for d in calibration | heldout)


def test_mix_split_adds_milton_and_keeps_heldout_out():
    mix, calibration = load_text("default:mix"), load_text("default")
    heldout = set(load_text("default:heldout").documents)
    assert set(calibration.documents) < set(mix.documents)
    assert not heldout & set(mix.documents)
    assert any("Areopagitica" in d[:3000] or "AREOPAGITICA" in d[:3000] for d in mix.documents)
    assert not any("Poemata" in d[:500] for d in set(mix.documents) - set(calibration.documents))


# ---------------------------------------------------------------- recipes with several sources


def _fake_sdist(folder, filename, members: dict[str, str]):
    """A .tar.gz holding members (path -> text); returns (path, sha256)."""
    import io
    import tarfile

    from cqil_cli.core.files import sha256_file

    path = folder / filename
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path, sha256_file(path)


@pytest.fixture()
def fake_recipes(tmp_path, monkeypatch):
    """A recipes folder with two fake sdists: `old` (`oldbook`, Gutenberg text) and `modern`
    (`newdocs`, reStructuredText); write_recipe(name, toml, change) adds a recipe, its sources
    filled in, then changed."""
    from cqil_cli.inputs import text as text_module

    old, old_sha = _fake_sdist(tmp_path, "oldbook-1.0.tar.gz", {
        f"oldbook-1.0/texts/{name}.txt":
            f"Header\n*** START OF THIS PROJECT GUTENBERG EBOOK ***\n{name.upper()} " +
            "thou art more lovely and more temperate " * 40 + "\n*** END OF THIS PROJECT GUTENBERG"
        for name in ("sonnet", "hamlet", "lear")})
    new, new_sha = _fake_sdist(tmp_path, "newdocs-2.0.tar.gz", {
        f"newdocs-2.0/docs/{name}.txt": f"{name.title()}\n=====\n\nThe {name} guide says: "
        "read the manual before you deploy the service. " * 30 +
        "\n\n.. code-block:: python\n\n    import secret_code\n"
        for name in ("intro", "howto", "faq")})
    files = {"oldbook-1.0.tar.gz": (old, old_sha), "newdocs-2.0.tar.gz": (new, new_sha)}

    def fetch(package, version, filename, sha256, sdist):
        assert sdist and files[filename][1] == sha256
        return files[filename][0]

    recipes = tmp_path / "recipes"
    recipes.mkdir()
    monkeypatch.setattr(text_module, "recipes_dir", lambda: recipes)
    monkeypatch.setattr(text_module, "fetch_pypi_file", fetch)
    sources = {
        "old": f'kind = "pypi-sdist"\npackage = "oldbook"\nversion = "1.0"\n'
               f'filename = "oldbook-1.0.tar.gz"\nsha256 = "{old_sha}"\nlicence = "public domain"',
        "modern": f'kind = "pypi-sdist"\npackage = "newdocs"\nversion = "2.0"\n'
                  f'filename = "newdocs-2.0.tar.gz"\nsha256 = "{new_sha}"\nlicence = "BSD-3"\n'
                  'strip = "rst"'}

    def write_recipe(name, body, change=lambda recipe: recipe):
        (recipes / f"{name}.toml").write_text(change(body.format(**sources)))

    return write_recipe


TWO_SOURCES = """
[sources.old]
{old}

[sources.modern]
{modern}

[splits.calibration]
include = ["old:oldbook-1.0/texts/*.txt", "modern:newdocs-2.0/docs/*.txt"]
exclude = ["modern:newdocs-2.0/docs/faq.txt"]
exclude_splits = ["heldout"]
shares = {{ old = 0.75, modern = 0.25 }}

[splits.heldout]
include = ["old:oldbook-1.0/texts/hamlet.txt"]
"""


def test_a_recipe_reads_several_sources_each_stripped_its_way(fake_recipes):
    fake_recipes("two", TWO_SOURCES)
    text = load_text("two")
    assert text.sources == ("modern", "modern", "old", "old")  # howto, intro; lear, sonnet
    assert text.shares == (("modern", 0.25), ("old", 0.75))
    assert [d.split()[0] for d in text.documents] == ["Howto", "Intro", "LEAR", "SONNET"]
    assert not any("START OF" in d or "secret_code" in d or "=====" in d
                   for d in text.documents)
    assert load_text("two:heldout").documents[0].startswith("HAMLET")


def test_shares_decide_how_many_windows_each_source_gives(fake_recipes, tokenizer):
    fake_recipes("two", TWO_SOURCES)
    windows = token_samples(tokenizer, "two", 8, 24, seed=0)
    again = token_samples(tokenizer, "two", 8, 24, seed=0)
    assert windows.shape == (8, 24) and torch.equal(windows, again)
    texts = [tokenizer.decode(row) for row in windows]
    old = [t for t in texts if "thou" in t or "temperate" in t or "lovely" in t]
    assert len(old) == 6 and all("manual" not in t and "deploy" not in t for t in old)


def test_an_old_single_source_recipe_still_reads(fake_recipes):
    fake_recipes("single", '[source]\n{old}\n\n[splits.calibration]\n'
                           'include = ["oldbook-1.0/texts/*.txt"]\n')
    text = load_text("single")
    assert len(text.documents) == 3 and text.shares == ()


@pytest.mark.parametrize("change, message", [
    (lambda r: r.replace('"old:oldbook', '"oldbook'), "must start with one of old:, modern:"),
    (lambda r: r.replace("old = 0.75", "old = 0.5"), "add up to 0.75"),
    (lambda r: r.replace(", modern = 0.25", "").replace("old = 0.75", "old = 1"),
     "shares name old but the split reads modern, old"),
    (lambda r: r.replace('strip = "rst"', 'strip = "html"'), "strips 'html'"),
])
def test_a_wrong_recipe_is_a_clear_error(fake_recipes, change, message):
    fake_recipes("bad", TWO_SOURCES, change)
    with pytest.raises(CqilError, match=message):
        load_text("bad")


def test_rst_is_reduced_to_its_prose():
    from cqil_cli.inputs.text import strip_rst

    raw = ("=====\nTitle\n=====\n\n.. _target:\n\nUse :setting:`MIDDLEWARE` and ``x = 1``; see\n"
           ":doc:`the guide </topics/http>` or :doc:`/ref/models`, `Python <https://python.org>`_"
           " and :class:`~django.db.Model`. Example::\n\n    code()\n\n"
           ".. note::\n    :class: small\n\n    **Keep** this.\n\n.. code-block:: python\n\n"
           "    more_code()\n\n.. toctree::\n   :maxdepth: 1\n\n   intro\n\nThe end.")
    assert strip_rst(raw) == ("Title\n\nUse MIDDLEWARE and x = 1; see\nthe guide or models, "
                              "Python and Model. Example:\n\nKeep this.\n\nThe end.")


def test_the_mix_recipe_keeps_default_heldout_and_ood_out():
    mix = load_text("mix")
    default_heldout = load_text("default:heldout").documents
    assert not (set(default_heldout) | set(load_text("default:ood").documents)) & set(mix.documents)
    assert load_text("mix:heldout").documents == default_heldout
    assert not set(load_text("mix:heldout-django").documents) & set(mix.documents)
    assert set(mix.sources) == {"shakespeare", "milton", "django"}
    assert dict(mix.shares) == {"shakespeare": 0.4, "milton": 0.1, "django": 0.5}
    django = [d for d, s in zip(mix.documents, mix.sources, strict=True) if s == "django"]
    assert not any("\n    " in d or ":setting:`" in d for d in django)  # no code blocks, roles
