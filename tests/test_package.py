"""The installable package: metadata that matches requirements.txt, a wheel whose commands work from any folder,
the model zoo registered by `import catchup.models`, and graph-cut methods that say how to get their optional
dependency."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import timm

import catchup.models
from catchup.errors import CatchupError
from catchup.mix import build_mixer

ROOT = Path(__file__).resolve().parents[1]


def _requirement_lines(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def test_package_dependencies_are_requirements_txt_with_graph_cuts_as_an_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    graph_cut = [r for r in _requirement_lines(ROOT / "requirements.txt") if r.startswith("gco-wrapper")]
    assert len(graph_cut) == 1
    assert project["dependencies"] == [r for r in _requirement_lines(ROOT / "requirements.txt") if r not in graph_cut]
    assert project["optional-dependencies"]["graphcut"] == graph_cut
    assert project["optional-dependencies"]["dev"] == _requirement_lines(ROOT / "requirements-dev.txt")
    assert set(project["scripts"]) == {"catchup-train", "catchup-evaluate"}


def test_the_wheel_lists_every_subpackage():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "catchup").rglob("__init__.py")}
    assert set(packages) == on_disk | {"catchup.scripts"}


def test_importing_catchup_models_registers_the_zoo_with_timm():
    assert "preactresnet18" in catchup.models.MODEL_NAMES
    model = timm.create_model("preactresnet18", num_classes=3, width=4)
    assert model.num_classes == 3


@pytest.mark.parametrize("imports", ["import catchup.models, timm", "import timm, catchup.models"])
def test_a_fresh_interpreter_gets_the_zoo_whichever_is_imported_first(imports, tmp_path):
    code = (f"{imports}\nfrom timm import create_model\n"
            "print(type(create_model('preactresnet18', num_classes=3, width=4)).__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "PreActResNet"


def test_import_catchup_and_the_argument_checks_load_no_torch_and_hook_nothing(tmp_path):
    """The scripts check a recipe before torch loads (a mistyped key answers in a fraction of a second), and
    importing the package leaves the import system as it was."""
    code = ("import runpy, sys; finders = list(sys.meta_path)\n"
            "import catchup, catchup.config, catchup.config_help, catchup.rundir, catchup.stopping, catchup.suites\n"
            "hooked = sys.meta_path != finders\n"
            "sys.argv = ['train.py', '--config', 'configs/quickstart.yaml', '--lrr', '3']\n"
            "try:\n    runpy.run_path('train.py', run_name='__main__')\n"
            "except SystemExit as stop:\n"
            "    print(stop.code, sorted(m for m in ('torch', 'timm') if m in sys.modules), hooked)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert out.stdout.strip() == "2 [] False", out.stderr
    assert out.stderr.strip() == "error: unknown recipe key 'lrr' on the command line; did you mean 'lr'?"


@pytest.mark.parametrize("method", ["puzzlemix", "comixup"])
def test_graph_cut_methods_without_gco_say_how_to_install_it(monkeypatch, method):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gco" else real(name, *a))
    model = timm.create_model("resnet18_cifar", num_classes=4)
    with pytest.raises(CatchupError) as err:
        build_mixer(method, model, num_classes=4)
    assert "\n" not in str(err.value) and "gco-wrapper" in str(err.value) and "pip install" in str(err.value)


@pytest.mark.slow
def test_wheel_installs_commands_that_work_from_another_folder(tmp_path):
    """The slowest test of the file (a wheel build and four fresh interpreters): the package as a user installs
    it, into a throwaway environment that reuses this one's packages and downloads nothing."""
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "catchup", source / "catchup", ignore=ignore)
    for name in ("pyproject.toml", "README.md", "train.py", "evaluate.py"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(tmp_path / "wheel")], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "wheel").glob("catchup-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    # This interpreter's packages (a venv's, where the suite runs in one) through a .pth file: --system-site-packages
    # would give the base interpreter's instead
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True)
    shutil.rmtree(source)                       # nothing may come from the source tree any more
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    check_import = ("import catchup.models, timm, catchup.scripts.train; "
                    "print(catchup.__file__); print(type(timm.create_model('preactresnet18', num_classes=3)).__name__)")
    commands = {
        "import": [str(python), "-c", check_import],
        "train-help": [str(bin_dir / "catchup-train"), "--help"],
        "evaluate-help": [str(bin_dir / "catchup-evaluate"), "--help"],
        "train": [str(bin_dir / "catchup-train"), "--config", str(ROOT / "configs" / "quickstart.yaml"),
                  "--output", "run", "--max-steps", "1", "--batch-size", "32", "--model-kwargs", "{width: 4}",
                  "--wandb-mode", "disabled"],
    }
    running = {k: subprocess.Popen(c, cwd=elsewhere, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True) for k, c in commands.items()}
    out = {}
    for key, proc in running.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{key}: {stderr[-2000:]}"
        out[key] = stdout
    location, model_class = out["import"].split()
    assert location.startswith(str(venv)) and model_class == "PreActResNet"
    assert "--config" in out["train-help"] and "--mix-prob" in out["train-help"] and "(recipe keys)" in out["train-help"]
    assert "--suite" in out["evaluate-help"]
    results = json.loads((elsewhere / "run" / "results.json").read_text())
    assert results["steps"] == 1 and (elsewhere / "run" / "model.safetensors").is_file()
