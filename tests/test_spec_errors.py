"""Bad sweep files and options: one line naming file and key, exit 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ablations.cli import main
from ablations.spec import load_profile, load_sweep

GOOD = "settings:\n  - {label: a, reduction: 8}\n  - {label: b, se: false}\n"

CASES = {
    "malformed": ("settings: [ {label: a, reduction: 8\n", "malformed YAML"),
    "unknown_key": ("settings:\n  - {label: a, reduktion: 8}\n", "settings[0].reduktion: unknown key"),
    "unknown_top_key": ("setings: []\nsettings:\n  - {label: a}\n", "setings: unknown key"),
    "duplicate": ("settings:\n  - {label: a}\n  - {label: a, reduction: 4}\n", "duplicate labels ['a']"),
    "empty": ("settings: []\n", "settings: needs a non-empty list"),
    "r_zero": ("settings:\n  - {label: a, reduction: 0}\n", "settings[0].reduction"),
    "r_too_big": ("settings:\n  - {label: a, reduction: 5000}\n", "settings[0].reduction"),
    "squeeze": ("settings:\n  - {label: a, squeeze: median}\n", "settings[0].squeeze"),
    "gate": ("settings:\n  - {label: a, gate: softmax}\n", "settings[0].gate"),
    "position": ("settings:\n  - {label: a, position: inside}\n", "settings[0].position"),
    "stage": ("settings:\n  - {label: a, stages: [1, 2]}\n", "settings[0].stages"),
    "arch": ("settings:\n  - {label: a, backbone: {arch: resnet51}}\n", "settings[0].backbone.arch"),
    "backbone_key": ("settings:\n  - {label: a, backbone: {depth: 3}}\n", "settings[0].backbone.depth"),
    "se_flag": ("settings:\n  - {label: a, se: maybe}\n", "settings[0].se"),
    "se_false_with_keys": ("settings:\n  - {label: a, se: false, reduction: 4}\n", "settings[0].reduction"),
    "seeds": ("seeds: 0\nsettings:\n  - {label: a}\n", "seeds"),
    "reference": ("reference: zzz\nsettings:\n  - {label: a}\n", "reference"),
    # beyond SE (tests/plugin_modules.py holds the plug-ins)
    "attention_unknown": ("settings:\n  - {label: a, attention: sk}\n",
                          "settings[0].attention: unknown attention module"),
    "plugin_import": ("settings:\n  - {label: a, attention: 'no_such_pkg.gates:Gate'}\n",
                      "settings[0].attention: cannot import 'no_such_pkg.gates' (ModuleNotFoundError"),
    "plugin_class": ("settings:\n  - {label: a, attention: 'plugin_modules:Gate'}\n",
                     "settings[0].attention: 'plugin_modules' has no class 'Gate'"),
    "plugin_shape": ("settings:\n  - {label: a, attention: 'plugin_modules:Halves'}\n",
                     "settings[0].attention: Halves_2_1: forward maps (1, 256, 56, 56) to (1, 128, 56, 56)"),
    "plugin_args": ("settings:\n  - {label: a, attention: 'plugin_modules:NeedsWidth', attention_args: {w: 1}}\n",
                    "settings[0].attention_args: plugin_modules:NeedsWidth(256, w=1) failed: TypeError"),
    "se_only_key": ("settings:\n  - {label: a, attention: cbam, reduction: 8}\n",
                    "settings[0].reduction: an SE-only key; attention 'cbam' takes its options in attention_args"),
    "se_only_default": ("settings:\n  - {label: a, attention: eca, gate: sigmoid}\n",
                        "settings[0].gate: an SE-only key"),
    "se_args": ("settings:\n  - {label: a, attention_args: {k: 3}}\n",
                "settings[0].attention_args: the paper's SE takes its options as keys of the setting"),
    "no_slot": ("settings:\n  - {label: a, attention: eca, backbone: {arch: efficientnet_lite0}}\n",
                "settings[0].attention: EfficientNet model has no attention slot"),
    "no_slot_family": ("settings:\n  - {label: a, backbone: {arch: vit_tiny_patch16_224}}\n",
                       "settings[0].attention: vit_tiny_patch16_224 has no attention slot"),
    "timm_on_resnet": ("settings:\n  - {label: a, attention: timm}\n",
                       "settings[0].attention: a plain ResNet has no attention module of its own"),
    "family_position": ("settings:\n  - {label: a, attention: timm, position: pre, backbone: {arch: regnety_002}}\n",
                        "settings[0].position: RegNet has one attention slot per block"),
    "published_source": ("settings:\n  - {label: a, published: {top1_err: 22.5}}\n",
                         "settings[0].published.source: Field required"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_sweep_file(case, tmp_path, capsys):
    text, expected = CASES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    code = main(["complexity", str(path), "--profile", "paper"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and err.startswith("error: ")
    assert str(path) in err and expected in err, err


def test_good_sweep_file(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text(GOOD)
    assert main(["complexity", str(path), "--profile", "quick", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("setting,params_m,gflops,paper_params_m,paper_gflops")
    assert [line.split(",")[0] for line in lines[1:]] == ["a", "b"]
    sweep = load_sweep(path)
    assert sweep.name == "mine" and sweep.settings[1].se is None and sweep.settings[0].se.reduction == 8


def test_bad_options(capsys):
    assert main(["complexity", "ratio", "--set", "data.input_sise=3"]) == 2
    assert "--set: data.input_sise: unknown key" in capsys.readouterr().err
    assert main(["complexity", "no_such_sweep"]) == 2
    assert "unknown sweep" in capsys.readouterr().err
    assert main(["complexity", "ratio", "--profile", "no_such_profile"]) == 2
    assert "unknown profile" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["complexity", "ratio", "--format", "xml"])
    assert e.value.code == 2


def test_profile_override_types():
    p = load_profile("quick", ["train.epochs=3", "data.batch_size=32", "backbone.small_stem=false"])
    assert (p.train.epochs, p.data.batch_size, p.backbone.small_stem) == (3, 32, False)


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("r_too_big", "reduction: must be in 1..C for a block with C=256 channels (got 5000)"),
    ("plugin_import", "settings[0].attention: cannot import 'no_such_pkg.gates'"),
])
def test_cli_prints_no_traceback(tmp_path, case, message):
    path = tmp_path / "bad.yaml"
    path.write_text(CASES[case][0])
    proc = subprocess.run([sys.executable, "-m", "ablations", "complexity", str(path), "--profile", "paper"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert message in proc.stderr


def test_profile_name_must_be_an_identifier(tmp_path, capsys):
    """Study names are <sweep>-<profile>, read back by splitting at the last '-'."""
    path = tmp_path / "paper-sec6.yaml"
    path.write_text("description: a name with a dash\n")
    assert main(["complexity", "ratio", "--profile", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(path) in err
    assert "name: profile name 'paper-sec6' must be an identifier (letters, digits and _" in err
    (tmp_path / "paper_sec6.yaml").write_text("description: fine\n")
    assert load_profile(tmp_path / "paper_sec6.yaml").name == "paper_sec6"


def test_paper_profiles_keep_the_two_recipes_apart():
    """Sec. 6 (the ablation tables) and Sec. 5.1 (Tables 2-5) are different recipes (DESIGN.md)."""
    ablations, sec5 = load_profile("paper"), load_profile("paper_sec5")
    assert ablations.comparable_tables == tuple(range(10, 17)) and sec5.comparable_tables == (2, 3, 4, 5)
    t = ablations.train
    assert (t.schedule, t.lr, t.step_gamma, t.max_cuts, t.label_smoothing) == ("plateau", 0.1, 0.1, 3, 0.1)
    assert t.epochs >= 300 and ablations.data.batch_size == 256
    t = sec5.train
    assert (t.schedule, t.lr, t.step_every, t.epochs, sec5.data.batch_size) == ("step", 0.6, 30, 100, 1024)
    assert ablations.backbone == sec5.backbone and ablations.backbone.stride_in_1x1


def test_bad_plugin_stops_ablate_run_before_anything_is_created(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text(CASES["plugin_shape"][0])
    results = tmp_path / "results"
    assert main(["run", str(path), "--results-dir", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(path) in err and "settings[0].attention: Halves_2_1" in err
    assert not results.exists()


