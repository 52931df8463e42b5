"""Typed plug-in options: every option of every registered plug-in is declared, and a value
outside its declaration (or one that cannot apply with the rest of the run) is refused before the
model loads, naming the key and the allowed values."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import pytest

from gblm.errors import ConfigError
from gblm.methods import registry
from gblm.options import OneOf, Range, check_value, declared_options
from tests.conftest import compose_config


def _plugins() -> list[tuple[str, registry.MethodEntry, tuple[str, ...]]]:
    methods = [registry.method_entry(n) for n in registry.method_names()]
    updates = [("reconstruct", e, ()) for e in registry.reconstruct_entries() if e.target]
    return (
        [("method", e, ()) for e in methods if e.target]
        + updates
        + [("sparsity", e, registry.ALLOCATOR_INPUTS) for e in registry.allocator_entries()]
    )


@pytest.mark.parametrize(
    ("key", "entry", "inputs"), [pytest.param(*p, id=f"{p[0]}={p[1].name}") for p in _plugins()]
)
def test_every_option_of_every_plugin_is_declared_and_its_defaults_pass(key, entry, inputs):
    declared = registry.options_of(entry.target, skip=inputs)  # TypeError if one is undeclared
    assert set(entry.options) <= set(declared), "the registry file names an unknown option"
    defaults = {name: o.default for name, o in declared.items() if not o.required}
    checked = registry.check_options(key, entry.target, {**defaults, **entry.options}, inputs)
    assert set(checked) == set(declared)


class _Undeclared:
    def __init__(self, a=1) -> None: ...


class _NumberWithoutRange:
    def __init__(self, a: float = 1.0) -> None: ...


@pytest.mark.parametrize(
    ("plugin", "needle"),
    [
        (_Undeclared, r"_Undeclared\(a\): the option has no annotation"),
        (_NumberWithoutRange, r"a number needs its Range"),
        (_Undeclared.__init__, r"\(a\): the option has no annotation"),
    ],
)
def test_an_undeclared_option_is_the_plugins_bug(plugin, needle):
    with pytest.raises(TypeError, match=needle):
        declared_options(plugin)


RATIO = Annotated[float, Range(ge=0, lt=1)]


@pytest.mark.parametrize(
    ("value", "annotation", "message"),
    [
        (float("nan"), Annotated[float, Range(ge=0)], "k=nan: allowed values are a finite number >= 0."),
        (float("inf"), Annotated[float, Range()], "k=inf: allowed values are a finite number."),
        ("abc", Annotated[float, Range(gt=0)], "k='abc': allowed values are a finite number > 0."),
        (True, Annotated[float, Range()], "k=True: allowed values are a finite number."),
        (1.0, RATIO, "k=1.0: allowed values are a finite number in [0, 1)."),
        ("abc", Annotated[int, Range(ge=0)], "k='abc': allowed values are an integer >= 0."),
        (1.5, Annotated[int, Range(ge=0)], "k=1.5: allowed values are an integer >= 0."),
        (False, Annotated[int, Range(ge=0)], "k=False: allowed values are an integer >= 0."),
        ("maybe", bool, "k='maybe': allowed values are true, false."),
        ("true", bool, "k='true': allowed values are true, false."),
        (1, bool, "k=1: allowed values are true, false."),
        ("x", bool | None, "k='x': allowed values are true, false, or null."),
        ("col", Annotated[str, OneOf(("row", "layer"))], "k='col' is not allowed: choose one of row, layer."),
        ([0.5, 1.5], list[RATIO] | None, "k[1]=1.5: allowed values are a finite number in [0, 1)."),
        (0.5, list[RATIO], "k=0.5: allowed values are a list (each a finite number in [0, 1))."),
        ("x", dict[str, Any] | None, "k='x': allowed values are a mapping of options, or null."),
        (0, Annotated[int, Range(ge=1)] | Annotated[str, OneOf(("auto",))], "an integer >= 1 or auto."),
    ],
)  # fmt: skip
def test_a_value_outside_its_declaration_is_refused_naming_what_is_allowed(
    value, annotation, message
):
    with pytest.raises(ConfigError) as err:
        check_value("k", value, annotation)
    assert str(err.value).endswith(message), str(err.value)


@pytest.mark.parametrize(
    ("value", "annotation", "expected"),
    [
        (2, Annotated[float, Range(ge=0)], 2.0),  # an int given to a float option
        (float("inf"), Annotated[float, Range(gt=0, finite=False)], float("inf")),
        (None, Annotated[str, OneOf(("row",))] | None, None),
        ("auto", Annotated[int, Range(ge=1)] | Annotated[str, OneOf(("auto",))], "auto"),
        ((0.1, 0.2), list[RATIO], [0.1, 0.2]),
    ],
)
def test_allowed_values_pass(value, annotation, expected):
    got = check_value("k", value, annotation)
    assert got == expected and type(got) is type(expected)


def _refusal(*overrides: str) -> str:
    """The message of the ConfigError that ``overrides`` get before the model loads."""
    from gblm.config import build_method, build_plan, to_plain, validate

    with pytest.raises(ConfigError) as err:
        conf = validate(to_plain(compose_config("model=tiny_llama", *overrides)))
        build_method(conf), build_plan(conf)
    return str(err.value)


# One case or more per option family: every method's options, every allocator's options.
CASES = [
    (["method=magnitude", "method.comparison_group=column"], "method.comparison_group='column' is not allowed: choose one of row, layer"),
    (["method=wanda", "method.use_variant=maybe"], "method.use_variant='maybe': allowed values are true, false"),
    (["method=wanda", "method.comparison_group=1"], "method.comparison_group=1"),
    (["method=sparsegpt", "method.blocksize=0"], "method.blocksize=0: allowed values are an integer >= 1"),
    (["method=sparsegpt", "method.percdamp=nan"], "method.percdamp=nan: allowed values are a finite number >= 0"),
    (["method=sparsegpt", "method.true_sequential=1"], "method.true_sequential=1: allowed values are true, false"),
    (["method=gblm", "method.scale=inf"], "method.scale=inf: allowed values are a finite number >= 0"),
    (["method=gblm", "method.norm=l3"], "method.norm='l3' is not allowed: choose one of l1, l2"),
    (["method=gblm", "method.accumulator_dtype=int8"], "choose one of float16, float32, bfloat16"),
    (["method=gblm", "method.score=taylor"], "method.score='taylor' is not allowed: choose one of"),
    (["method=gblm", "method.gradient_group_size=2.5"], "method.gradient_group_size=2.5: allowed values are an integer >= 1"),
    (["method=ria", "method.a=nan"], "method.a=nan: allowed values are a finite number >= 0"),
    (["method=ria", "method.a=abc"], "method.a='abc': allowed values are a finite number >= 0"),
    (["method=ria", "method.a=-1"], "method.a=-1"),
    (["method=ria", "method.reallocation=maybe"], "method.reallocation='maybe': allowed values are true, false"),
    (["method=ria", "method.lsa=yes"], "method.lsa='yes': allowed values are true, false"),
    (["method=admm", "method.gradual=-1"], "method.gradual=-1: allowed values are an integer >= 0"),
    (["method=admm", "method.rho=0"], "method.rho=0: allowed values are a finite number > 0"),
    (["reconstruct=obs", "reconstruct.blocksize=0"], "reconstruct.blocksize=0: allowed values are an integer >= 1"),
    (["reconstruct=obs", "reconstruct.iterative=maybe"], "reconstruct.iterative='maybe': allowed values are true, false"),
    (["reconstruct=admm", "reconstruct.iters=abc"], "reconstruct.iters='abc': allowed values are an integer >= 0"),
    (["reconstruct=admm", "reconstruct.percdamp=nan"], "reconstruct.percdamp=nan: allowed values are a finite number >= 0"),
    (["method=pruner_zero", "method.norm=l3"], "method.norm='l3' is not allowed: choose one of l1, l2"),
    (["method=pruner_zero", "method.scale=nan"], "method.scale=nan: allowed values are a finite number >= 0"),
    (["method=dsnot", "method.threshold=-1"], "method.threshold=-1: allowed values are a finite number >= 0"),
    (["method=dsnot", "method.max_cycle=abc"], "method.max_cycle='abc': allowed values are an integer >= 0"),
    (["method=dsnot", "method.max_cycle=1.5"], "method.max_cycle=1.5: allowed values are an integer >= 0"),
    (["method=dsnot", "method.var_power=inf"], "method.var_power=inf"),
    (["method=dsnot", "method.layers=mlp"], "method.layers='mlp' is not allowed: choose one of attention, all"),
    (["method=dsnot", "method.comparison_group=col"], "method.comparison_group='col': allowed values are one of row, layer, or null"),
    (["method=dsnot", "method.initial=pruneall"], "method.initial='pruneall' is not allowed: choose one of"),
    (["method=dsnot", "method.initial=gblm", "+method.initial_options.norm=l3"], "method.initial_options.norm='l3' is not allowed: choose one of l1, l2"),
    (["method=dsnot", "method.initial=sparsegpt", "+method.initial_options.percdamp=nan"], "method.initial_options.percdamp=nan"),
    (["method=dsnot", "method.initial_options=abc"], "method.initial_options='abc': allowed values are a mapping of options, or null"),
    (["sparsity=owl", "sparsity.lmbda=nan"], "sparsity.lmbda=nan: allowed values are a finite number >= 0"),
    (["sparsity=owl", "sparsity.lmbda=-0.1"], "sparsity.lmbda=-0.1"),
    (["sparsity=owl", "sparsity.outlier_m=0"], "sparsity.outlier_m=0.0: allowed values are a finite number > 0"),
    (["sparsity=linear", "sparsity.spread=inf"], "sparsity.spread=inf: allowed values are a finite number >= 0"),
    (["sparsity=per_block", "sparsity.per_block=[0.5,nan]"], "sparsity.per_block[1]=nan: allowed values are a finite number in [0, 1)"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "needle"), CASES)
def test_a_bad_option_is_refused_naming_the_key_and_the_allowed_values(overrides, needle):
    assert needle in _refusal(*overrides)


def test_every_method_and_every_allocator_with_options_has_a_refusal_case():
    covered = {o.split("=", 1)[1] for overrides, _ in CASES for o in overrides[:1]}
    families = {e.name for key, e, inputs in _plugins() if registry.options_of(e.target, inputs)}
    assert families <= covered, families - covered


# Options that cannot apply in a combination ------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["method=ria", "method.reallocation=true"], "method.reallocation=true permutes the columns of N:M groups"),
        (["method=ria", "method.reallocation=true", "method.lsa=true"], "sparsity=nm_2_4 or nm_4_8"),
        (["method=dsnot", "method.initial=ria", "+method.initial_options.reallocation=true", "sparsity=unstructured"], "method.reallocation=true"),
        (["method=wanda", "method.use_variant=true", "sparsity=nm_2_4"], "method.use_variant=true is for unstructured sparsity only"),
        (["save_dtype=float16"], "save_dtype='float16' needs save_model=true"),
        (["+push_to_hub=a/b"], "push_to_hub='a/b' needs save_model=true"),
    ],
)  # fmt: skip
def test_an_option_that_cannot_apply_is_refused(overrides, needle):
    assert needle in _refusal(*overrides)


def test_options_that_apply_are_taken():
    from gblm.config import build_method, to_plain, validate

    conf = validate(to_plain(compose_config("method=ria", "sparsity=nm_2_4", "method.a=1",
                                            "method.reallocation=true", "method.lsa=true")))  # fmt: skip
    method = build_method(conf)
    assert (method.a, method.reallocation, method.lsa) == (1.0, True, True)
    assert isinstance(method.a, float)


def test_wandb_settings_with_the_local_logger_are_warned_about(caplog):
    from gblm.config import to_plain, validate

    with caplog.at_level(logging.WARNING, logger="gblm"):
        validate(to_plain(compose_config("logger.mode=offline", "logger.project=p")))
    assert "logger.project='p', logger.mode='offline': W&B settings, ignored" in caplog.text
    assert "logger.mode='nope' is not allowed: choose one of auto, online" in _refusal(
        "logger.mode=nope"
    )


def test_an_unknown_layer_in_mask_images_is_refused_before_the_model_loads():
    from gblm.analysis.plots import check_mask_images
    from gblm.config import MASK_IMAGES, to_plain, validate

    def check(*overrides):
        conf = validate(to_plain(compose_config("model=tiny_opt", *overrides)))
        if conf.mask_images != list(MASK_IMAGES):  # as the inputs' check does
            check_mask_images(conf.mask_images, conf.model)

    with pytest.raises(ConfigError) as err:
        check("mask_images=[model.layers.0.fc1]")
    message = str(err.value)
    assert "mask_images: 'model.layers.0.fc1' is not a prunable Linear of model=" in message
    assert "model.decoder.layers.1.fc2 (mask_images=[] draws none)" in message
    check()  # the default names: none on OPT, drawn nowhere, refused nowhere
    check("mask_images=[model.decoder.layers.1.fc1]")
