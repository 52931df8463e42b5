"""What a benchmark run measures: the models (tiny LLaMAs, SmolLM2), the data, the presets."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ModelCase:
    """One benchmarked model: a tiny LLaMA config, or the embedded SmolLM2-135M."""

    name: str
    hidden: int = 0
    intermediate: int = 0
    layers: int = 0
    heads: int = 0
    vocab: int = 8192
    sweeps: tuple[str, ...] = ()  # "width" and/or "depth"
    smollm2: bool = False

    def build(self) -> nn.Module:
        """The fp32 model in eval mode (seeded random init for tiny configs)."""
        if self.smollm2:
            from gblm.models.loading import ModelSpec, load_model_and_tokenizer

            model, _ = load_model_and_tokenizer(ModelSpec(), torch.device("cpu"), torch.float32)
            return model
        from gblm.models.tiny import build_tiny_model, tiny_config

        config = tiny_config(
            "llama",
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_layers=self.layers,
            num_heads=self.heads,
            vocab_size=self.vocab,
        )
        return build_tiny_model(config, seed=0)


def llama_case(hidden: int, layers: int, sweeps: tuple[str, ...], vocab: int = 8192) -> ModelCase:
    """A tiny LLaMA of ``hidden`` width (MLP 8/3 wider, rounded to 8; heads of 64, at least 2)."""
    intermediate = int(round(hidden * 8 / 3 / 8)) * 8
    heads = max(2, hidden // 64)
    return ModelCase(
        f"llama_h{hidden}_l{layers}", hidden, intermediate, layers, heads, vocab, sweeps
    )


SMOLLM2 = ModelCase("smollm2_135m", smollm2=True)


@dataclass(frozen=True)
class Settings:
    """What one benchmark run measures."""

    mode: str
    cases: tuple[ModelCase, ...]
    nsamples: int
    seqlen: int
    eval_windows: int
    repeats: int
    probe: str | None  # the case that gets the extras (batching, bf16, block by block, reference)
    threads: int = 1
    sparsity: float = 0.5
    memory: bool = True
    smollm2_repeats: int = 1
    # magnitude's and Wanda's scoring and masking, replayed on the walk's own inputs, best of
    # these many: a few percent of the passes, it is easily moved by the machine's memory noise
    replays: int = 5


def preset(mode: str, *, smollm2: bool = False, threads: int = 1) -> Settings:
    """``default`` (~5 min here), ``quick`` (~1 min) or ``smoke`` (seconds, for the test)."""
    if mode == "default":
        width = [llama_case(h, 4, ("width",)) for h in (128, 256, 384, 512)]
        width[1] = replace(width[1], sweeps=("width", "depth"))
        depth = [llama_case(256, layers, ("depth",)) for layers in (2, 8)]
        settings = Settings(
            mode, (*width, *depth), nsamples=8, seqlen=256, eval_windows=4, repeats=3,
            probe="llama_h512_l4",
        )  # fmt: skip
    elif mode == "quick":
        cases = (
            llama_case(256, 2, ("width", "depth")),
            llama_case(384, 2, ("width",)),
            llama_case(256, 4, ("depth",)),
        )
        settings = Settings(
            mode, cases, nsamples=8, seqlen=128, eval_windows=2, repeats=2, probe="llama_h384_l2"
        )
    elif mode == "smoke":
        cases = (
            llama_case(64, 1, ("width", "depth"), vocab=512),
            llama_case(128, 1, ("width",), vocab=512),
            llama_case(64, 2, ("depth",), vocab=512),
        )
        settings = Settings(
            mode, cases, nsamples=2, seqlen=32, eval_windows=1, repeats=1, probe="llama_h128_l1"
        )
    else:
        raise ValueError(f"mode={mode!r}: allowed values are default, quick, smoke.")
    if smollm2:
        settings = replace(settings, cases=(*settings.cases, SMOLLM2))
    return replace(settings, threads=threads)


def random_ids(rows: int, cols: int, vocab: int, seed: int) -> Tensor:
    """(rows, cols) token ids drawn uniformly from the vocabulary, seeded."""
    return torch.randint(0, vocab, (rows, cols), generator=torch.Generator().manual_seed(seed))


@dataclass
class Prepared:
    """A model and its data: N calibration windows and the evaluation tokens, seeded."""

    case: ModelCase
    model: nn.Module
    windows: Tensor  # (N, T)
    eval_tokens: Tensor  # (1, eval_windows * T)


def prepare(case: ModelCase, settings: Settings) -> Prepared:
    """Build the model and draw random token windows from its vocabulary (seeded)."""
    model = case.build()
    vocab = model.get_input_embeddings().weight.shape[0]
    windows = random_ids(settings.nsamples, settings.seqlen, vocab, seed=0)
    eval_tokens = random_ids(1, settings.eval_windows * settings.seqlen, vocab, seed=1)
    return Prepared(case, model, windows, eval_tokens)
