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
