"""The model's own sampled text (calibrate/self_text.py) and the `+self` text spec."""

import pytest
import torch
from tiny_models import BOS_ID, EOS_ID, offline_tokenizer, tiny_model

from cqil_cli.calibrate.self_text import calibration_windows, sampled_windows
from cqil_cli.core.errors import CqilError
from cqil_cli.inputs.text import SELF_SHARE, load_text, split_self_share, token_samples


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama-gqa")


@pytest.fixture(scope="module")
def tokenizer():
    return offline_tokenizer()


def test_sampled_windows_shape_determinism_and_prompts(model, tokenizer):
    prompts = torch.tensor([[10, 11, 12], [20, 21, 22]])
    state = torch.random.get_rng_state()
    a = sampled_windows(model, tokenizer, 5, 10, seed=3, prompts=prompts, batch_size=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global state is untouched
    b = sampled_windows(model, tokenizer, 5, 10, seed=3, prompts=prompts, batch_size=3)
    c = sampled_windows(model, tokenizer, 5, 10, seed=4, prompts=prompts, batch_size=3)
    assert a.shape == (5, 10) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :3], prompts[torch.tensor([0, 1, 0, 1, 0])])  # prompts in turn
    assert not (a[:, 3:] == EOS_ID).any()  # end of sequence suppressed: every window is full


def test_sampled_windows_start_from_bos_without_prompts(model, tokenizer):
    windows = sampled_windows(model, tokenizer, 3, 8, seed=0)
    assert windows.shape == (3, 8) and (windows[:, 0] == BOS_ID).all()
    with pytest.raises(CqilError, match="prompts must be"):
        sampled_windows(model, tokenizer, 2, 4, seed=0, prompts=torch.zeros(2, 4, dtype=torch.long))


def test_self_suffix_parses_and_plain_loading_refuses_it():
    assert split_self_share("mix") == ("mix", 0.0)
    assert split_self_share("mix+self") == ("mix", SELF_SHARE)
    assert split_self_share("default:heldout+self=0.5") == ("default:heldout", 0.5)
    for bad in ("mix+self=1.5", "mix+self=0", "+self"):
        with pytest.raises(CqilError, match="0 < SHARE < 1"):
            split_self_share(bad)
    with pytest.raises(CqilError, match="needs the model"):
        load_text("mix+self")


def test_calibration_windows_mix_text_and_sampled(model, tokenizer, text_file):
    spec = f"{text_file}+self=0.25"
    windows = calibration_windows(model, tokenizer, spec, 8, 16, seed=1)
    again = calibration_windows(model, tokenizer, spec, 8, 16, seed=1)
    assert windows.shape == (8, 16) and torch.equal(windows, again)
    text_rows = {tuple(r) for r in token_samples(tokenizer, str(text_file), 200, 16, 1).tolist()}
    stream = tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"]
    all_windows = {tuple(stream[i:i + 16]) for i in range(0, len(stream) - 15, 16)}
    from_text = [tuple(r) in all_windows for r in windows.tolist()]
    assert sum(from_text) == 6  # 2 of 8 sampled by the model
    assert text_rows  # the text itself has windows enough
    plain = calibration_windows(model, tokenizer, str(text_file), 8, 16, seed=1)
    assert torch.equal(plain, token_samples(tokenizer, str(text_file), 8, 16, 1))
