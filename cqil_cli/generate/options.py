"""Settings of `cqil generate`, defined once with their command-line options (core/options.py),
without importing torch."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..core.errors import CqilError
from ..core.options import check_ranges, option

RUN, SAMPLE = "What to generate", "Sampling"


@dataclass
class GenerateOptions:
    new_tokens: int = option(32, "Tokens to generate per prompt (fewer when it ends with "
                             "end-of-sequence).", min=1, section=RUN)
    ranks: int | None = option(
        None, "W: run on W local ranks (cqil's distributed engine), started here; under "
        "torchrun each process is one rank and W is the launcher's world size.", metavar="W",
        min=1, kind=int, aliases=("--devices",), section=RUN,
        default_text="1, or torchrun's world size")
    do_sample: bool = option(False, "Draw each token from the model's distribution instead of "
                             "taking the most likely one (greedy, the default).", section=SAMPLE)
    temperature: float = option(1.0, "With --do-sample: divide the logits by this first.",
                                min=0, min_open=True, section=SAMPLE)
    top_k: int | None = option(None, "With --do-sample: draw among the K most likely tokens "
                               "only.", metavar="K", min=1, kind=int, section=SAMPLE)
    top_p: float | None = option(None, "With --do-sample: draw among the most likely tokens "
                                 "whose probability reaches P (nucleus sampling).", metavar="P",
                                 min=0, max=1, min_open=True, kind=float, section=SAMPLE)
    seed: int = option(0, "With --do-sample: the generator's seed (every rank draws the same "
                       "tokens).", section=SAMPLE)

    def check(self) -> None:
        check_ranges(self)
        if not self.do_sample and (self.top_k is not None or self.top_p is not None
                                   or self.temperature != 1.0):
            raise CqilError("--temperature, --top-k and --top-p need --do-sample")
        world = launcher_world_size()
        if world is not None and self.ranks is not None and self.ranks != world:
            raise CqilError(f"--ranks {self.ranks} but torchrun started {world} ranks (leave "
                            "--ranks out under torchrun)")

    @property
    def world_size(self) -> int:
        """W: --ranks, else the launcher's world size under torchrun, else 1."""
        if self.ranks is not None:
            return self.ranks
        return launcher_world_size() or 1


def launcher_world_size() -> int | None:
    """WORLD_SIZE when torchrun (or another launcher) started this process as one rank."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return None
