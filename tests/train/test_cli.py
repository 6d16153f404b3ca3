"""The trainer's command line: one flag per TrainConfig field, bad values refused before any work."""

import subprocess
import sys

import pytest

from memcom_torchrec.train.cli import parse_config
from memcom_torchrec.train.config import TrainConfig, train_flags


def test_every_field_is_a_flag() -> None:
    cfg = parse_config(["--method", "qr", "--compression-ratio", "8", "--hidden", "64", "32", "--k", "5"])
    assert (cfg.method, cfg.compression_ratio, cfg.hidden, cfg.k) == ("qr", 8.0, [64, 32], 5)
    flags = train_flags()  # what launch/ checks pass-through flags against, without torch
    assert flags["--compression-ratio"] == "float" and flags["--hidden"] == "list" and flags["--k"] == "int"
    assert len(flags) == len(TrainConfig.__dataclass_fields__)


def test_each_model_gets_its_own_default_scorer() -> None:
    assert parse_config(["--model", "ranknet"]).scorer == "dot"
    assert parse_config([]).scorer == "linear"
    cfg = parse_config(["--model", "ranknet", "--scorer", "mlp", "--use-user-id", "false"])
    assert (cfg.scorer, cfg.use_user_id) == ("mlp", False)


@pytest.mark.parametrize("argv,message", [
    (["--method", "memcon"], "error: unknown embedding method 'memcon'; choose one of ['uncompressed'"),
    (["--model", "deep"], "error: unknown model 'deep'; choose one of ['next_item', 'ranknet']"),
    (["--scorer", "mlp"], "error: unknown scorer 'mlp' for model 'next_item'; choose one of ['linear', 'tied']"),
])
def test_bad_values_are_usage_errors(argv, message, capsys) -> None:
    with pytest.raises(SystemExit, match="^2$") as exited:  # argparse's usage error
        parse_config(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_cluster_vectors_is_checked_on_the_command_line(capsys) -> None:
    for argv, message in [
        (["--cluster-vectors", "rows"], "unknown --cluster-vectors 'rows'; choose one of ['table', 'output']"),
        (["--cluster-vectors", "output", "--scorer", "tied"], "--cluster-vectors output needs an output layer"),
    ]:
        with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error
            parse_config(argv)
        assert message in capsys.readouterr().err
    assert parse_config(["--cluster-vectors", "output"]).cluster_vectors == "output"


def test_bad_input_is_one_line_naming_it(tmp_path):
    """A missing dataset: exit 2 and one line naming it, not a (rank-prefixed) traceback."""
    missing = str(tmp_path / "no_data")
    proc = subprocess.run([sys.executable, "-m", "memcom_torchrec.train", "--data-dir", missing, "--out-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"memcom-train: error: {missing}/manifest.json: no manifest; prepare the dataset first with "
        "`memcom-data prepare` or `memcom-data synth`"], proc.stderr[-3000:]
