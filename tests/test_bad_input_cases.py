"""Each bad input of issue 14 that used to end in a traceback, a FAILED trial or silence: now one line
naming the file or option and key, exit status 2, and nothing created."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from ablations import cli
from ablations.errors import SpecError
from ablations.schema import MAX_SEEDS
from ablations.spec import load_profile, load_sweep

ONE = "settings:\n  - {label: a, se: false}\n"


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err.strip()


def _one_line(rc: int, err: str, *expected: str) -> None:
    assert rc == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.fixture
def sweep(tmp_path) -> Path:
    return _write(tmp_path / "one.yaml", ONE)


# ---------------------------------------------------------------------------------------------------
# Tracebacks before


def test_a_sweep_file_that_is_not_utf8(tmp_path, capsys):
    path = _write(tmp_path / "latin1.yaml", "settings:\n  - {label: café}\n".encode("latin-1"))
    rc, _, err = _cli(capsys, "complexity", path)
    _one_line(rc, err, f"{path}: not UTF-8 text (byte 0xe9 at offset 25)")


@pytest.mark.parametrize("command", [
    ["run", "SWEEP", "--results-dir", "FILE"], ["run", "SWEEP", "--results-dir", "FILE/sub"],
    ["status", "--results-dir", "FILE"], ["table", "ratio", "--results-dir", "FILE/x"],
    ["train", "--out", "FILE"], ["train", "--out", "FILE/run"],
    ["launch", "--slurm", "SWEEP", "--logs", "FILE/logs", "--executor", "local"],
])
def test_a_directory_option_that_is_a_file_or_lies_under_one(command, tmp_path, sweep, capsys):
    file = _write(tmp_path / "plain-file", "not a directory\n")
    argv = [str(sweep) if a == "SWEEP" else a.replace("FILE", str(file)) for a in command]
    rc, _, err = _cli(capsys, *argv)
    option = next(a for a in argv if a.startswith("--") and a != "--slurm")
    _one_line(rc, err, f"error: {option}: {file}")
    assert "not a directory" in err or f"lies under {file}, which is a file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.yaml", "plain-file"]


def test_a_non_numeric_port_in_a_storage_url(sweep, tmp_path, capsys):
    rc, _, err = _cli(capsys, "run", sweep, "--storage", "postgresql://u@db:fivefour/x",
                      "--results-dir", tmp_path / "r")
    _one_line(rc, err, "--storage: postgresql://u@db:fivefour/x: the port must be a number in 1..65535")


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_dashboard_port_out_of_range(port, tmp_path, capsys):
    rc, _, err = _cli(capsys, "dashboard", "--port", port, "--results-dir", tmp_path / "r")
    _one_line(rc, err, f"error: --port: must be a port number in 1..65535 (got {port})")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
@pytest.mark.parametrize("command", ["table", "status"])
def test_a_garbage_or_truncated_optuna_db(damage, command, analysis_results, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(analysis_results, results)
    db = results / "optuna.db"
    data = db.read_bytes()
    db.write_bytes(b"this is no database" * 300 if damage == "garbage" else data[: len(data) // 3])
    argv = ["table", "ratio"] if command == "table" else ["status"]
    rc, _, err = _cli(capsys, *argv, "--results-dir", results)
    _one_line(rc, err, f"error: --storage: sqlite:///{db}: cannot ")


def test_analysis_reads_postgresql_urls_through_the_runners_resolver(analysis_results, capsys):
    """`ablate table --storage postgresql://...` (the README's form) used to die on psycopg 3's ImportError;
    now it reaches the server (here: none listening) and says so."""
    for command in (["table", "ratio"], ["tables"], ["report"]):
        rc, _, err = _cli(capsys, *command, "--results-dir", analysis_results,
                          "--storage", "postgresql://ablate:s3cret@127.0.0.1:1/sweeps")
        _one_line(rc, err, "error: --storage: postgresql+psycopg2://ablate:***@127.0.0.1:1/sweeps: cannot read the "
                           "storage: connection to server at \"127.0.0.1\", port 1 failed")
        assert "s3cret" not in err


# ---------------------------------------------------------------------------------------------------
# Caught too late before (a study was created, its first trial FAILED)


@pytest.mark.parametrize(("options", "expected"), [
    (["--set", "backbone.num_classes=3"],
     "quick.yaml (with --set): backbone.num_classes: digits has 10 classes but backbone.num_classes is 3"),
    (["--set", "data.val_fraction=0.999"],
     "quick.yaml (with --set): data.val_fraction: 0.999 leaves digit class 0 (178 images) without training images"),
    (["--set", "data.val_fraction=0.001"], "data.val_fraction: 0.001 leaves digit class 0 (178 images) without "
                                           "validation images"),
    (["--set", "data.dataset=cifar10", "--data-root", "NOWHERE"], "error: --data-root: NOWHERE: no such directory"),
    (["--set", "data.dataset=cifar100", "--set", "data.root=NOWHERE"], "data.root: NOWHERE: no such directory"),
    (["--set", "data.dataset=cifar10", "--data-root", "EMPTY"], "EMPTY: has no cifar-10-batches-py/"),
    (["--set", "data.dataset=imagefolder", "--data-root", "FOLDERS"],
     "quick.yaml (with --set): backbone.num_classes: imagefolder has 2 classes but backbone.num_classes is 10"),
    (["--set", "data.batch_size=5000"], "data.batch_size: 5000 is larger than the training set (1438 images)"),
    (["--seeds", str(MAX_SEEDS + 1)], f"--seeds: must be a positive integer up to {MAX_SEEDS} (got {MAX_SEEDS + 1})"),
    (["--seeds", "1000000000000"], "--seeds: must be a positive integer up to"),
    (["--precision", "0.5", "--max-seeds", str(MAX_SEEDS + 1)],
     f"--max-seeds: must be at most {MAX_SEEDS}, the seeds any setting can run (got {MAX_SEEDS + 1})"),
])
def test_the_whole_setting_and_profile_is_checked_before_any_study(options, expected, sweep, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    folders = tmp_path / "folders"
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (folders / split / cls).mkdir(parents=True)
    names = {"NOWHERE": str(tmp_path / "nowhere"), "EMPTY": str(empty), "FOLDERS": str(folders)}
    argv = [names.get(a, a.replace("NOWHERE", names["NOWHERE"])) for a in options]
    rc, _, err = _cli(capsys, "run", sweep, "--results-dir", tmp_path / "results", *argv)
    for placeholder, value in names.items():
        expected = expected.replace(placeholder, value)
    _one_line(rc, err, expected)
    assert not (tmp_path / "results").exists()


def test_a_setting_overriding_num_classes_is_named_in_the_sweep(tmp_path, capsys):
    path = _write(tmp_path / "nc.yaml", "settings:\n  - {label: a}\n  - {label: b, backbone: {num_classes: 7}}\n")
    rc, _, err = _cli(capsys, "run", path, "--results-dir", tmp_path / "results")
    _one_line(rc, err, f"{path}: settings[1].backbone.num_classes: digits has 10 classes")


# ---------------------------------------------------------------------------------------------------
# Silently accepted before


def test_duplicate_yaml_keys(tmp_path, capsys):
    path = _write(tmp_path / "dup.yaml", "seeds: 2\nsettings:\n  - {label: a, reduction: 4, reduction: 8}\n")
    rc, _, err = _cli(capsys, "complexity", path)
    _one_line(rc, err, f"{path}: line 3: malformed YAML: duplicate key 'reduction'")
    profile = _write(tmp_path / "p.yaml", "train:\n  epochs: 2\ntrain:\n  epochs: 3\n")
    with pytest.raises(SpecError, match="line 3: malformed YAML: duplicate key 'train'"):
        load_profile(profile)


def test_two_sweep_files_with_one_name(tmp_path, sweep, capsys):
    other = tmp_path / "elsewhere"
    other.mkdir()
    twin = _write(other / "one.yaml", ONE)
    rc, _, err = _cli(capsys, "run", sweep, twin, "--results-dir", tmp_path / "results")
    _one_line(rc, err, f"{twin}: name: sweep name 'one' is also the name of {sweep}")
    assert not (tmp_path / "results").exists()


def test_a_boolean_is_not_a_number(tmp_path, capsys):
    path = _write(tmp_path / "b.yaml", "settings:\n  - {label: a, reduction: true}\n")
    rc, _, err = _cli(capsys, "complexity", path)
    _one_line(rc, err, f"{path}: settings[0].reduction: must be a number, not true/false (got True)")
    for override, key in (("train.epochs=yes", "train.epochs"), ("backbone.layers=[1,true,1,1]", "backbone.layers"),
                          ("train.lr=.inf", "train.lr")):
        rc, _, err = _cli(capsys, "complexity", "ratio", "--set", override)
        _one_line(rc, err, f"(with --set): {key}: ")


def test_labels_are_text_as_written(tmp_path):
    path = _write(tmp_path / "l.yaml", "settings:\n  - {label: 010}\n  - {label: off}\n  - label: 1e3\n"
                                       "  - {label: '0x1F'}\n")
    assert [s.label for s in load_sweep(path).settings] == ["010", "off", "1e3", "0x1F"]


def test_unknown_table_numbers(tmp_path, capsys):
    path = _write(tmp_path / "t.yaml", "table: 99\n" + ONE)
    rc, _, err = _cli(capsys, "complexity", path)
    _one_line(rc, err, f"{path}: table: the paper has no published Table 99 (known: 2, 3, 4, 5, 10,")
    profile = _write(tmp_path / "p.yaml", "comparable_tables: [10, 17]\n")
    with pytest.raises(SpecError, match="comparable_tables: the paper has no published Table 17"):
        load_profile(profile)


def test_table_on_a_missing_or_non_results_directory(tmp_path, capsys):
    rc, out, err = _cli(capsys, "table", "ratio", "--results-dir", tmp_path / "nowhere")
    _one_line(rc, err, f"--results-dir: {tmp_path / 'nowhere'}: no such results directory")
    assert out == "" and not (tmp_path / "nowhere").exists()
    (tmp_path / "notes").mkdir()
    rc, out, err = _cli(capsys, "table", "ratio", "--results-dir", tmp_path / "notes")
    _one_line(rc, err, "not a results directory (no optuna.db and no run directories")


def test_status_on_a_results_dir_that_is_a_file_or_holds_no_storage(tmp_path, capsys):
    file = _write(tmp_path / "results", "x")
    rc, out, err = _cli(capsys, "status", "--results-dir", file)
    _one_line(rc, err, f"error: --results-dir: {file}: not a directory")
    rc, out, err = _cli(capsys, "status", "--results-dir", tmp_path)
    _one_line(rc, err, f"--results-dir: {tmp_path}: not a results directory (no optuna.db;")
    assert out == "" and not (tmp_path / "optuna.db").exists()
    rc, out, err = _cli(capsys, "status", "--storage", f"sqlite:///{tmp_path / 'other.db'}")
    _one_line(rc, err, f"--storage: sqlite:///{tmp_path / 'other.db'}: no such database")
    assert not (tmp_path / "other.db").exists()


def test_fine_inputs_still_pass(tmp_path):
    """The strict reading refuses what it should and nothing more: every shipped file loads."""
    for name in ("ratio", "squeeze", "excitation", "stages", "integration", "se3x3", "nosqueeze"):
        assert load_sweep(name).name == name
    for name in ("quick", "cifar", "paper"):
        assert load_profile(name).name == name
    assert load_profile("quick", ["train.lr=1", "backbone.small_stem=false"]).train.lr == 1.0
    path = _write(tmp_path / "ok.yaml", yaml.safe_dump({"table": 10, "settings": [{"label": "r=16"}]}))
    assert load_sweep(path).table == 10


@pytest.mark.parametrize(("sets", "expected"), [
    (["train.checkpoint_every_epochs=null"], "checkpoint_every_epochs and checkpoint_every_minutes are both null"),
    (["train.checkpoint_every_minutes=0"], "train.checkpoint_every_minutes: Input should be greater than 0"),
    (["train.sync_bn=maybe"], "train.sync_bn: Input should be a valid boolean"),
    (["train.compile=true", "train.sync_bn=true"], "train.compile: with batch norm synchronised over 2 ranks"),
])
def test_gpu_options(tmp_path, capsys, sets, expected):
    argv = ["train", "--profile", "quick", "--device", "cpu,cpu", "--out", tmp_path / "t"]
    rc, _, err = _cli(capsys, *argv, *[x for s in sets for x in ("--set", s)])
    _one_line(rc, err, expected)
    assert not (tmp_path / "t").exists()
