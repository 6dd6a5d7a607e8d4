import sgs_lab
from sgs_lab.cli import main


def test_version_is_exposed():
    assert sgs_lab.__version__.count(".") == 2


def test_cli_check_agrees_with_oracle(capsys):
    assert main(["check", "--device", "cpu"]) == 0
    assert "agrees with the loop oracle" in capsys.readouterr().out
