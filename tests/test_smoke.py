from pathlib import Path

import sgs_lab
from sgs_lab.cli import main


def test_version_is_exposed():
    assert sgs_lab.__version__.count(".") == 2


def test_cli_check_agrees_with_oracle(capsys):
    assert main(["check", "--device", "cpu"]) == 0
    assert "agrees with the loop oracle" in capsys.readouterr().out


def test_readme_quick_start_runs():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Quick start\s+```python\n(.*?)```", readme, re.DOTALL).group(1)
    namespace: dict = {}
    exec(compile(code, "README quick start", "exec"), namespace)
    assert namespace["stats"].cosine.shape == (2, 32)
    assert all(p.grad is not None for p in namespace["encoder"].parameters())


def test_ci_runs_exactly_the_readme_test_command():
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    command = readme.split("Tests:", 1)[1].split("```", 2)[1].strip()
    assert (root / ".ci" / "run").read_text().strip().splitlines()[-1] == command
