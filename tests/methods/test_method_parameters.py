"""Every setting in a method's code is a parameter of its spec (``name(key=value)``), and the settings of CAMERAS,
the Poly-CAMs, Group-CAM, Recipro-CAM and KPCA-CAM change the map as their formulas say, on tiny models; bad
values are one-line errors through the command, before the model is loaded."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from PIL import Image
from tests.testbed import assert_unchanged, load_tool, snapshot
from torch import nn
from typer.testing import CliRunner

import camkit
import camkit.cli.explain as cli_explain
from camkit.adapters import Preprocess
from camkit.adapters.zoo import LoadedModel
from camkit.cli import app
from camkit.errors import CamkitError
from camkit.methods import get_method, method_parameters
from camkit.methods import registry as reg
from camkit.methods.projection import kpca_projection
from camkit.methods.registry import PassMethod
from camkit.methods.sharper import _named, cameras, recipro_masks, stage_layers
from camkit.methods.spec import parse_spec

runner = CliRunner()


def _net(seed: int = 0) -> nn.Sequential:
    """Three resolutions (16, 8, 4 on a 16 x 16 input), GAP and a linear head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            c1=nn.Conv2d(3, 4, 3, padding=1),
            r1=nn.ReLU(),
            c2=nn.Conv2d(4, 6, 3, padding=1, stride=2),
            r2=nn.ReLU(),
            c3=nn.Conv2d(6, 6, 3, padding=1, stride=2),
            r3=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(6, 3),
        )
    ).eval()


def _raw(model: nn.Module, x: torch.Tensor, method: str, key: str, **kw: object) -> torch.Tensor:
    return camkit.explain(model, x, method, targets=1, relu=False, **kw).raw[key]  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ coverage


def test_every_setting_in_a_methods_code_is_a_parameter_of_its_spec() -> None:
    """Fails when a method's function takes a setting (a parameter with a default) that ``name(key=value)``
    cannot reach: give the method a factory (``register(method, factory, parameters)``) or, for a default that is
    not a setting, list it in tools/method_settings.py's NOT_SETTINGS with the reason."""
    assert load_tool("method_settings").unexposed_settings() == {}


def test_the_coverage_check_finds_a_forgotten_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    tool = load_tool("method_settings")
    forgot = PassMethod(name="forgotcam", run=_named("forgotcam", cameras), cost="", paper="", summary="")
    monkeypatch.setitem(reg.METHODS, "forgotcam", forgot)
    monkeypatch.setitem(reg._ALIASES, "forgotcam", "forgotcam")
    assert tool.unexposed_settings() == {"forgotcam": {"cameras.scales": (1.0, 1.5, 2.0)}}


def test_parameters_listed_with_defaults_by_camkit_methods() -> None:
    assert method_parameters("cameras") == {"scales": (1.0, 1.5, 2.0)}
    for name in ("polycam", "pcamp", "pcampm", "polycam-matched"):
        assert method_parameters(name) == {"layers": None, "stages": 3}
    assert method_parameters("groupcam") == {
        "groups": 32,
        "percentile": 70.0,
        "kernel_size": 51,
        "sigma": 50.0,
    }
    assert method_parameters("reciprocam") == {"batch_size": 64, "mask": "onehot"}
    assert method_parameters("kpcacam") == {"kernel": "sigmoid", "gamma": None, "degree": 3, "coef0": 1.0}
    res = runner.invoke(app, ["methods", "--format", "json"])
    rows = {r["name"]: r["parameters"] for r in json.loads(res.output)}
    assert rows["cameras"] == {"scales": [1.0, 1.5, 2.0]} and rows["polycam"] == {"layers": None, "stages": 3}


# ------------------------------------------------------------------------------------------------ the parser


def test_bracketed_bare_words_are_sequences_and_names_round_trip() -> None:
    assert parse_spec("polycam(layers=(blocks.3,bn2), stages=2)") == (
        "polycam",
        {"layers": ("blocks.3", "bn2"), "stages": 2},
    )
    assert parse_spec("polycam(layers=(layer4))") == ("polycam", {"layers": ("layer4",)})
    assert parse_spec("polycam(layers=[l3, l4])") == ("polycam", {"layers": ["l3", "l4"]})
    assert parse_spec("cameras(scales=(1, 1.5))") == ("cameras", {"scales": (1, 1.5)})
    assert parse_spec("cameras(scales=(2))") == ("cameras", {"scales": 2})  # a number, as in Python
    assert parse_spec("x(a=(a)(b))") == ("x", {"a": "(a)(b)"})  # not one sequence: the text
    for spec, name in [
        ("polycam(layers=(blocks.3,bn2))", "polycam(layers=('blocks.3', 'bn2'))"),
        ("polycam(layers='r1,r2')", "polycam(layers=('r1', 'r2'))"),
        ("cameras(scales=(1,))", "cameras(scales=(1.0,))"),
        ("cameras(scales=[1, 1.5, 2])", "cameras"),  # the defaults
        ("groupcam(groups=8, sigma=5)", "groupcam(groups=8, sigma=5.0)"),
        ("reciprocam(mask=gaussian)", "reciprocam(mask='gaussian')"),
        ("kpcacam(kernel=rbf, gamma=0.5)", "kpcacam(kernel='rbf', gamma=0.5)"),
    ]:
        assert get_method(spec).name == name
        assert get_method(name).name == name


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("cameras(scales=(0,))", "cameras: scales must be a non-empty sequence of factors > 0, got (0,)"),
        ("cameras(scales=2)", "scales must be a non-empty sequence"),
        ("cameras(scales=(1, x))", "got (1, 'x')"),
        ("polycam(layers=())", "polycam: layers must be layer names"),
        ("pcampm(layers=(r1, 2))", "pcampm: layers must be layer names"),
        ("polycam-matched(stages=0)", "polycam-matched: stages must be an integer >= 1, got 0"),
        ("groupcam(groups=0)", "groups must be an integer >= 1, got 0"),
        ("groupcam(percentile=100)", "groupcam: percentile must be a number in [0, 100), got 100"),
        ("groupcam(kernel_size=4)", "groupcam: kernel_size must be an odd integer >= 1, got 4"),
        ("groupcam(sigma=0)", "groupcam: sigma must be a number > 0, got 0"),
        ("reciprocam(mask=box)", "reciprocam: mask must be 'onehot' or 'gaussian', got 'box'"),
        ("reciprocam(batch_size=0)", "reciprocam: batch_size must be an integer >= 1, got 0"),
        ("kpcacam(kernel=cubic)", "kernel must be 'sigmoid', 'rbf', 'linear', 'poly' or 'cosine'"),
        ("kpcacam(gamma=-1)", "kpcacam: gamma must be a number > 0 or None"),
        ("kpcacam(degree=0)", "kpcacam: degree must be an integer >= 1, got 0"),
    ],
)
def test_bad_values_are_the_python_apis_errors(spec: str, needle: str) -> None:
    with pytest.raises(CamkitError) as err:
        get_method(spec)
    assert needle in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ the maps


def test_cameras_with_one_scale_is_the_single_scale_formula() -> None:
    """scales=(1,): mean over one scale, so the map is sum_k A_k G_k at the layer (HiResCAM's formula)."""
    model, x = _net(), torch.randn(2, 3, 16, 16)
    before = snapshot(model)
    one = _raw(model, x, "cameras(scales=(1,))", "cameras", layers="r3")
    torch.testing.assert_close(one, _raw(model, x, "hirescam", "r3", layers="r3"), rtol=1e-5, atol=1e-6)
    two = _raw(model, x, "cameras(scales=(1, 2))", "cameras", layers="r3")
    assert one.shape == (2, 4, 4) and two.shape == (2, 8, 8)  # the grid of the largest scale
    assert_unchanged(before, model)


def test_polycam_layers_given_by_name_are_its_layers() -> None:
    model, x = _net(), torch.randn(2, 3, 16, 16)
    auto = list(stage_layers(model, x))
    assert len(auto) == 3
    spec = f"({','.join(reversed(auto))})"  # any order: the recursion runs shallow to deep
    for name in ("polycam", "polycam-matched"):
        default = _raw(model, x, name, name)
        torch.testing.assert_close(_raw(model, x, f"{name}(layers={spec})", name), default)
        # the method's own layers win over the call's
        torch.testing.assert_close(_raw(model, x, f"{name}(layers={spec})", name, layers="r1,r2"), default)
        other = _raw(model, x, f"{name}(layers=({auto[1]},{auto[2]}))", name)
        assert other.shape != default.shape  # the shallowest layer's grid
        torch.testing.assert_close(other, _raw(model, x, name, name, layers=f"{auto[1]},{auto[2]}"))
    two = _raw(model, x, "polycam(stages=2)", "polycam")
    torch.testing.assert_close(two, _raw(model, x, f"polycam(layers=({auto[1]},{auto[2]}))", "polycam"))


def test_pcamp_takes_its_layers_by_name() -> None:
    model, x = _net(), torch.randn(1, 3, 16, 16)
    for name in ("pcamp", "pcampm"):
        mine = _raw(model, x, f"{name}(layers=(r2,r3))", name)
        torch.testing.assert_close(mine, _raw(model, x, name, name, layers="r2,r3"))
        assert mine.shape == (1, 8, 8)


def test_groupcam_settings() -> None:
    model, x = _net(), torch.randn(1, 3, 16, 16)
    default = _raw(model, x, "groupcam", "groupcam", layers="r3")
    assert float(default.abs().amax()) > 0
    # 6 channels: 6 groups whether 32 or 6 are asked for (torch.chunk)
    torch.testing.assert_close(_raw(model, x, "groupcam(groups=6)", "groupcam", layers="r3"), default)
    assert not torch.allclose(_raw(model, x, "groupcam(groups=1)", "groupcam", layers="r3"), default)
    assert not torch.allclose(_raw(model, x, "groupcam(percentile=0)", "groupcam", layers="r3"), default)
    # a 1-pixel kernel blurs nothing: the baseline is the input, every group's score gain is 0
    flat = _raw(model, x, "groupcam(kernel_size=1, sigma=1)", "groupcam", layers="r3")
    assert float(flat.abs().amax()) == 0.0


def test_reciprocam_gaussian_mask_spreads_the_cell_over_its_neighbours() -> None:
    """GAP head: the pooled masked map is A[:, i, j] * (the mask's mass at (i, j)) / (h w); the Gaussian's mass is
    1 inside the grid, 12/16 on an edge and 9/16 in a corner."""
    model, x = _net(), torch.randn(1, 3, 16, 16)
    got = _raw(model, x, "reciprocam(mask=gaussian, batch_size=5)", "reciprocam", layers="r3")
    mass = recipro_masks(4, 4, "gaussian").sum(dim=(1, 2, 3)).view(4, 4)
    assert mass[0, 0] == 9 / 16 and mass[0, 1] == 12 / 16 and mass[1, 1] == 1
    with torch.no_grad():
        a = model[:6](x)[0]  # [6, 4, 4]
        pooled = (a * mass / 16).flatten(1).T  # [16, 6]
        want = torch.softmax(model.fc(pooled), dim=1)[:, 1].view(1, 4, 4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    onehot = _raw(model, x, "reciprocam(batch_size=3)", "reciprocam", layers="r3")
    torch.testing.assert_close(onehot, _raw(model, x, "reciprocam", "reciprocam", layers="r3"))


def test_kpcacam_kernel_settings() -> None:
    model, x = _net(), torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        a = model[:6](x)
    got = _raw(model, x, "kpcacam(kernel=rbf, gamma=0.5)", "r3", layers="r3")
    torch.testing.assert_close(got, kpca_projection(a, "rbf", 0.5), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, _raw(model, x, "kpcacam", "r3", layers="r3"))


# ------------------------------------------------------------------------------------------------ the command


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "img.png"
    Image.new("RGB", (20, 18), (40, 200, 90)).save(path)
    return path


def _one_error_line(res: object, needle: str) -> None:
    assert res.exit_code == 2, res.output  # type: ignore[attr-defined]
    lines = [ln for ln in res.output.splitlines() if ln.strip()]  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in " ".join(lines), res.output  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("cameras(scales=(0,))", "scales must be a non-empty sequence of factors > 0"),
        ("groupcam(percentile=150)", "percentile must be a number in [0, 100)"),
        ("polycam(layers=())", "layers must be layer names"),
        ("reciprocam(mask=box)", "mask must be 'onehot' or 'gaussian'"),
    ],
)
def test_explain_refuses_bad_values_before_loading_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str, needle: str
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the methods were checked")

    monkeypatch.setattr(cli_explain, "load_model", refuse)
    _one_error_line(runner.invoke(app, ["explain", str(_image(tmp_path)), "--method", spec]), needle)


def test_explain_runs_configured_methods_and_refuses_an_unknown_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake(options: object, input_size: int | None = None) -> LoadedModel:
        return LoadedModel(_net(), Preprocess(size=(16, 16)), ["a", "b", "c"], "net")

    monkeypatch.setattr(cli_explain, "load_model", fake)
    img, out = _image(tmp_path), tmp_path / "out"
    res = runner.invoke(
        app,
        ["explain", str(img), "--methods", "polycam(layers=(r2,r3)),cameras(scales=(1,))", "-o", str(out)],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    methods = {e["method"] for e in summary if e["method"] != "grid"}
    assert methods == {"polycam(layers=('r2', 'r3'))", "cameras(scales=(1.0,))"}
    res = runner.invoke(
        app, ["explain", str(img), "--method", "polycam(layers=(r2,nolayer))", "-o", str(out)]
    )
    _one_error_line(res, "nolayer")
