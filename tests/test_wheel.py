"""The project as a wheel (not the editable checkout): every package and its data installed, the CLI runs.

The wheel is built from a copy of the sources (``pip wheel --no-deps``: no build/ or egg-info left in
the checkout) and installed with ``--no-deps`` into a fresh virtualenv that sees this interpreter's
site-packages (the dependencies) through a ``.pth`` file, so ``tokensaver`` itself can only come from
the wheel. Bounded: every step has a timeout.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tokensaver"

pytestmark = pytest.mark.skipif(not (ROOT / "pyproject.toml").is_file(), reason="needs a source checkout")


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args}: {out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the venv's python, the folder to run it from) with the wheel of this checkout installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(SOURCE, src / "tokensaver", ignore=ignore)
    shutil.copytree(ROOT / "plugins", src / "plugins", ignore=ignore)
    wheels = tmp / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)], tmp, 600)
    (wheel,) = wheels.glob("tokensaver-*.whl")

    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, 60
    ).stdout.strip()
    # the dependencies come from this interpreter; tokensaver itself only from the wheel (the editable
    # install's finder lives in a .pth there, which a path added this way does not run)
    (Path(purelib) / "_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ],
        tmp,
        300,
    )
    return python, tmp


def test_cli_runs_from_the_wheel(installed: tuple[Path, Path]) -> None:
    python, cwd = installed
    out = _run([str(python.parent / "tokensaver"), "--help"], cwd, 120).stdout
    for cmd in ("emulator", "bench", "report", "proxy", "demo"):
        assert cmd in out
    assert "(unavailable)" not in out  # every subcommand's module imported from the wheel
    assert (
        "usage: tokensaver bench"
        in _run([str(python), "-m", "tokensaver", "bench", "--help"], cwd, 120).stdout
    )
    assert "prune" in _run([str(python.parent / "tokensaver"), "plugins"], cwd, 120).stdout  # entry points


def test_every_package_and_data_file_is_installed(installed: tuple[Path, Path]) -> None:
    python, cwd = installed
    code = (
        "import tokensaver, tokensaver.emulator.validation, tokensaver.bench.render, "
        "tokensaver.report.formatting; print(tokensaver.__file__)"
    )
    where = Path(_run([str(python), "-c", code], cwd, 120).stdout.strip()).parent
    assert ROOT not in where.parents, where  # not the checkout
    wanted = {
        p.relative_to(SOURCE).as_posix()
        for p in SOURCE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    got = {
        p.relative_to(where).as_posix()
        for p in where.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert wanted - got == set()
    assert {"report/templates/report.html.j2", "bench/templates/bench.html.j2", "data/models.json"} <= got


def test_templates_render_from_the_wheel(installed: tuple[Path, Path]) -> None:
    python, cwd = installed
    code = (
        "from tokensaver.report import Report; r = Report({'name': 'w'}, []); "
        "print(len(r.to_html()) > 500 and 'w' in r.to_markdown())"
    )
    assert _run([str(python), "-c", code], cwd, 120).stdout.strip() == "True"
