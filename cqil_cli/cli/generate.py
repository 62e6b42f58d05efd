"""`cqil generate`: the click command over cqil_cli/generate (docs/generate.md)."""

from __future__ import annotations

import os

import click

from ..core.errors import CqilError
from .options import (
    State,
    check_writable,
    loading,
    model_options,
    rank_device,
    use_all_cores,
    write_outputs,
)


@click.command()
@click.argument("model")
@click.option("--prompt", "prompts", multiple=True, required=True, metavar="TEXT",
              help="A prompt; repeat for several (one left-padded batch).")
@click.option("--new-tokens", default=32, show_default=True, type=click.IntRange(min=1),
              help="Tokens to generate per prompt (fewer when it ends with end-of-sequence).")
@click.option("--devices", default=1, show_default=True, type=click.IntRange(min=1),
              help="W: run on W local ranks (cqil's distributed engine); started here, or be "
                   "one rank when torchrun started this process.")
@click.option("--do-sample", is_flag=True,
              help="Draw each token from the model's distribution instead of taking the most "
                   "likely one (greedy, the default).")
@click.option("--temperature", default=1.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="With --do-sample: divide the logits by this first.")
@click.option("--top-k", type=click.IntRange(min=1), metavar="K",
              help="With --do-sample: draw among the K most likely tokens only.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), metavar="P",
              help="With --do-sample: draw among the most likely tokens whose probability "
                   "reaches P (nucleus sampling).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="With --do-sample: the generator's seed (every rank draws the same tokens).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), metavar="PATH",
              help="Write the tokens, texts and timings (schema cqil.generate/1).")
@model_options
@click.pass_obj
def generate(state: State, model, prompts, new_tokens, devices, do_sample, temperature, top_k,
             top_p, seed, json_path, device, dtype, trust_remote_code, allow_pickle):
    """Continuations of each --prompt by MODEL (a converted folder or any causal LM).

    \b
    Greedy by default; --do-sample draws (temperature, top-k, top-p, seed).
    One device by default: cqil's engine for a converted folder or a model of a family cqil
    converts (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3), transformers' generate() for any
    other. --devices W runs such a model or folder on W local processes (gloo on CPU, NCCL with W GPUs), split as the grouping
    allows; the tokens are those of one device. Under torchrun (several machines) each
    process is one rank. See docs/generate.md.
    """
    from ..generate.run import Sampling

    json_target = check_writable(json_path, "JSON")
    if not do_sample and (top_k is not None or top_p is not None or temperature != 1.0):
        raise CqilError("--temperature, --top-k and --top-p need --do-sample")
    sampling = Sampling(do_sample, temperature, top_k, top_p, seed)
    prompts = list(prompts)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if devices == 1 and world > 1:
        raise CqilError(f"torchrun started {world} ranks: pass --devices {world}")
    if devices > 1:
        result = _run_distributed(state, model, prompts, new_tokens, devices, device, dtype,
                                  trust_remote_code, allow_pickle, sampling)
        if result is None:  # a rank other than 0 under torchrun: rank 0 reports
            return
    else:
        from ..generate.run import generate_single
        from ..inputs.models import load_model

        use_all_cores()
        with loading(state, f"loading {model}"):
            loaded = load_model(model, device=device, dtype=dtype,
                                trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        result = generate_single(loaded, prompts, new_tokens, sampling)
    _show(state, result)
    write_outputs(state, result, json_target, None, None, "")


def _run_distributed(state, model, prompts, new_tokens, devices, device, dtype,
                     trust_remote_code, allow_pickle, sampling):
    """The GenerateResult of W ranks (None on a torchrun rank other than 0)."""
    from ..core.launch import is_rank, launch_local
    from ..generate.run import GenerateRequest, GenerateResult, generate_rank
    from ..inputs.ranks import check_world_size

    note = check_world_size(model, devices, trust_remote_code)
    if note and int(os.environ.get("RANK", "0")) == 0:
        state.err.print(f"note: {note}", markup=False, highlight=False)
    request = GenerateRequest(model, prompts, new_tokens, rank_device(device, devices), dtype,
                              trust_remote_code, allow_pickle, sampling)
    if is_rank():  # torchrun started this process: be one rank of its group
        world = int(os.environ["WORLD_SIZE"])
        if world != devices:
            raise CqilError(f"--devices {devices} but torchrun started {world} ranks")
        document = generate_rank(request)
        return None if document is None else GenerateResult.from_json(document)
    with loading(state, f"generating on {devices} ranks"):
        return GenerateResult.from_json(launch_local(generate_rank, request, devices,
                                                     "cqil-generate"))


def _show(state: State, result) -> None:
    """The continuations on stdout (the command's output: shown with --quiet too), the timing
    line on stderr."""
    several = len(result.texts) > 1
    for i, (prompt, text) in enumerate(zip(result.prompts, result.texts, strict=True)):
        if several:
            click.echo(f"--- prompt {i + 1}: {prompt}")
        click.echo(text)
    t = result.timings
    decode = t.get("decode_ms_per_token")
    decode_text = f", decode {decode:.2f} ms/token" if decode is not None else ""
    where = f"{result.devices} ranks" if result.devices > 1 else result.device
    state.err.print(f"{result.engine} engine on {where}: prefill {t['prefill_ms']:.1f} ms"
                    f"{decode_text}", markup=False, highlight=False)
