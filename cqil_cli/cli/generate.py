"""`cqil generate`: the click command over cqil_cli/generate (docs/generate.md)."""

from __future__ import annotations

import os

import click

from ..generate.options import RUN, SAMPLE, GenerateOptions
from . import options as shared
from .declare import CqilOption, SectionedCommand, build, dataclass_options, global_flags


@click.command(cls=SectionedCommand, sections=(RUN, SAMPLE, shared.WHERE, shared.OUTPUT))
@click.argument("model")
@click.option("--prompt", "prompts", multiple=True, required=True, metavar="TEXT",
              cls=CqilOption, section=RUN,
              help="A prompt; repeat for several (one left-padded batch).")
@dataclass_options(GenerateOptions)
@shared.json_option("Write the tokens, texts and timings (schema cqil.generate/1).")
@shared.model_options
@global_flags
@click.pass_obj
def generate(state: shared.State, model, prompts, json_path, device, dtype, trust_remote_code,
             allow_pickle, **params):
    """Continuations of each --prompt by MODEL (a converted folder or any causal LM).

    \b
    Greedy by default; --do-sample draws (temperature, top-k, top-p, seed).
    One device by default: cqil's engine for a converted folder or a model of a family cqil
    converts (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3), transformers' generate() for any
    other. --ranks W runs such a model or folder on W local processes (gloo on CPU, NCCL
    with W GPUs), split as the grouping allows; the tokens are those of one device. Under
    torchrun (several machines) each process is one rank and W is the launcher's world size.
    See docs/generate.md.
    """
    options = build(GenerateOptions, params)
    options.check()
    json_target = shared.check_writable(json_path, "JSON", ".json")
    shared.check_positions(shared.check_model_spec(model, allow_pickle), options.new_tokens + 1,
                    "--new-tokens (+ the prompt)")
    from ..generate.run import Sampling

    sampling = Sampling(options.do_sample, options.temperature, options.top_k, options.top_p,
                        options.seed)
    prompts = list(prompts)
    new_tokens, devices = options.new_tokens, options.world_size
    if devices > 1:
        result = _run_distributed(state, model, prompts, new_tokens, devices, device, dtype,
                                  trust_remote_code, allow_pickle, sampling)
        if result is None:  # a rank other than 0 under torchrun: rank 0 reports
            return
    else:
        from ..generate.run import generate_single
        from ..inputs.models import load_model

        shared.use_all_cores()
        with shared.loading(state, f"loading {model}"):
            loaded = load_model(model, device=device, dtype=dtype,
                                trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        result = generate_single(loaded, prompts, new_tokens, sampling)
    _show(state, result)
    shared.write_outputs(state, result, json_target, None, None, "")


def _run_distributed(state, model, prompts, new_tokens, devices, device, dtype,
                     trust_remote_code, allow_pickle, sampling):
    """The GenerateResult of W ranks (None on a torchrun rank other than 0)."""
    from ..core.launch import is_rank, launch_local
    from ..generate.run import GenerateRequest, GenerateResult, generate_rank
    from ..inputs.ranks import check_world_size

    note = check_world_size(model, devices, trust_remote_code)
    if note and int(os.environ.get("RANK", "0")) == 0:
        state.err.print(f"note: {note}", markup=False, highlight=False)
    request = GenerateRequest(model, prompts, new_tokens, shared.rank_device(device, devices), dtype,
                              trust_remote_code, allow_pickle, sampling)
    if is_rank():  # torchrun started this process: be one rank of its group (W is its size)
        document = generate_rank(request)
        return None if document is None else GenerateResult.from_json(document)
    with shared.loading(state, f"generating on {devices} ranks"):
        return GenerateResult.from_json(launch_local(generate_rank, request, devices,
                                                     "cqil-generate"))


def _show(state: shared.State, result) -> None:
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
