"""Task runner for the runcycles workspace.

``nox -s ci`` is what CI and the README's test command run: every check in the current
(uv-managed) environment, one after the other. The other sessions build isolated uv
environments per package and Python version for the GitHub matrix.
"""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["ci"]
nox.options.error_on_missing_interpreters = False

PACKAGES = [
    "runcycles",
    "runcycles-anyagent",
    "runcycles-langchain",
    "runcycles-openai-agents",
    "runcycles-server",
]
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
SOURCES = [f"packages/{name}/src" for name in PACKAGES]
TEST_DIRS = [f"packages/{name}/tests" for name in PACKAGES]
PLAIN_PATH_TESTS = [
    f"packages/runcycles/tests/{name}"
    for name in (
        "guarded",
        "test_client.py",
        "test_client_contract.py",
        "test_client_parity.py",
        "test_fastpath.py",
        "test_hot_path.py",
        "test_http11.py",
        "test_http_core.py",
        "test_journal.py",
        "test_settlement.py",
        "test_settlement_claims.py",
        "test_wire.py",
    )
]
"""The core tests that go through ``runcycles._fastpath``: run again with it off in ``ci``."""
LINTED = ["packages", "tests-integration", "benchmarks", "examples", "noxfile.py"]


def _typecheck(session: nox.Session) -> None:
    session.run("mypy", *SOURCES)
    # Tests are type-checked too, without demanding annotations on every test function.
    for tests in TEST_DIRS:
        session.run("mypy", "--allow-untyped-defs", "--allow-incomplete-defs", tests)
    session.run("mypy", "--allow-untyped-defs", "--allow-incomplete-defs", "tests-integration")
    session.run("mypy", "examples")


@nox.session(venv_backend="none")
def ci(session: nox.Session) -> None:
    """Run lint, types and the whole test suite in the current environment."""
    session.run("ruff", "format", "--check", *LINTED)
    session.run("ruff", "check", *LINTED)
    _typecheck(session)
    session.run("pytest", *session.posargs)
    if not session.posargs:
        # Every shortcut through httpx/pydantic internals off (their public-API twins):
        # the client must behave the same (about 30 s).
        session.run("pytest", "-q", *PLAIN_PATH_TESTS, env={"RUNCYCLES_FASTPATH": "0"})
        # The lowest framework versions we declare, and the wheels as users install them.
        agents_floor(session)
        langchain_floor(session)
        anyagent_floor(session)
        anyagent_backends(session)
        packaging(session)


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    """Check formatting and lint rules."""
    session.run("ruff", "format", "--check", *LINTED)
    session.run("ruff", "check", *LINTED)


@nox.session(venv_backend="none")
def typecheck(session: nox.Session) -> None:
    """Run mypy --strict on every package and on the tests."""
    _typecheck(session)


@nox.session(python=PYTHONS)
@nox.parametrize("package", PACKAGES)
def tests(session: nox.Session, package: str) -> None:
    """Run one package's unit tests in an isolated environment (the CI matrix)."""
    if package == "runcycles-anyagent":
        if session.python == "3.10":
            session.skip("any-agent needs Python 3.11 or later")
        package += "[openai]"  # its tests drive the openai backend too
    session.install("-e", f"packages/{package}")
    if package != "runcycles":
        session.install("-e", "packages/runcycles")
    session.install(
        "pytest", "pytest-asyncio", "pytest-timeout", "respx", "hypothesis", "jsonschema", "pyyaml"
    )
    session.run("pytest", f"packages/{package.split('[')[0]}/tests", *session.posargs)


@nox.session(venv_backend="none")
def integration(session: nox.Session) -> None:
    """Run the end-to-end tests against real server processes (SQLite and Redis)."""
    session.run("pytest", "tests-integration", *session.posargs, env=dict(os.environ))


@nox.session(venv_backend="none")
def recovery(session: nox.Session) -> None:
    """Run every client-recovery scenario through the profile's process adapter, one by one.

    Feeds each scenario of ``spec/client-recovery-scenarios.yaml`` to
    ``python -m runcycles.testing.recovery_adapter SCENARIO_ID`` and fails if any scenario
    fails or is bound to no native test (``--jobs N``, ``--verbose`` pass through).
    """
    session.run("python", "tests-integration/run_recovery_profile.py", *session.posargs)


@nox.session(venv_backend="none")
def benchmarks(session: nox.Session) -> None:
    """Run every benchmark and print its ratios."""
    for script in sorted(os.listdir("benchmarks")):
        if script.endswith(".py") and not script.startswith("_"):
            session.run("python", f"benchmarks/{script}")


@nox.session(venv_backend="none")
def docs(session: nox.Session) -> None:
    """Build the documentation site strictly."""
    session.run("mkdocs", "build", "--strict")


@nox.session(venv_backend="none")
def agents_floor(session: nox.Session) -> None:
    """Run the OpenAI Agents SDK package's tests on the lowest openai-agents it declares.

    openai-agents 0.6.0 predates openai 2.45's required ``cache_write_tokens`` (its own
    ``Usage`` fails to build with newer openai), so openai is held below 2.45 here.
    """
    session.run(
        "uv", "run", "--with", "openai-agents==0.6.0", "--with", "openai<2.45",
        "pytest", "-p", "no:cacheprovider", "packages/runcycles-openai-agents/tests",
        "tests-integration/test_openai_agents_e2e.py",
        "tests-integration/test_seed_openai_agents.py",
        *session.posargs, external=True,
    )  # fmt: skip


@nox.session(venv_backend="none")
def anyagent_floor(session: nox.Session) -> None:
    """Run the AnyAgent package's tests on the lowest any-agent it declares (1.16.0)."""
    session.run(
        "uv", "run", "--with", "any-agent==1.16.0",
        "pytest", "-p", "no:cacheprovider", "packages/runcycles-anyagent/tests",
        "tests-integration/test_anyagent_e2e.py", "tests-integration/test_seed_anyagent.py",
        *session.posargs, external=True,
    )  # fmt: skip


@nox.session(venv_backend="none")
def anyagent_backends(session: nox.Session) -> None:
    """Run the AnyAgent package's tests with any-agent's langchain backend installed too."""
    session.run(
        "uv", "run", "--with", "any-agent[langchain]>=1.16,<2",
        "pytest", "-p", "no:cacheprovider", "packages/runcycles-anyagent/tests",
        *session.posargs, external=True,
    )  # fmt: skip


@nox.session(venv_backend="none")
def langchain_floor(session: nox.Session) -> None:
    """Run the LangChain package's tests on the lowest langchain and langchain-core it declares.

    langchain 1.0.0 takes langgraph 1.0.x; the newest langgraph-checkpoint (4.x) and
    langgraph-prebuilt (1.1+) need a newer langchain-core / langgraph, so they are held back
    to what a fresh install of langchain 1.0.0 worked with.
    """
    session.run(
        "uv", "run", "--with", "langchain==1.0.0", "--with", "langchain-core==1.0.0",
        "--with", "langgraph-checkpoint<4", "--with", "langgraph-prebuilt<1.0.2",
        "pytest", "-p", "no:cacheprovider", "packages/runcycles-langchain/tests",
        "tests-integration/test_langchain_e2e.py", *session.posargs, external=True,
    )  # fmt: skip


@nox.session(venv_backend="none")
def packaging(session: nox.Session) -> None:
    """Build every package, install the wheels in a fresh venv (no workspace), run them.

    Runs the seed README's quick start (``packaging_check.py``; ``CYCLES_SEEDS_DIR`` or
    ``../shared/seeds``), the AnyAgent guide's quick start (``packaging_check_anyagent.py``),
    the LangChain page's quick start (``packaging_check_langchain.py``) and ``cycles demo``
    from the installed wheels, outside the repository.
    """
    import pathlib
    import tempfile

    root = pathlib.Path.cwd()
    seeds = pathlib.Path(os.environ.get("CYCLES_SEEDS_DIR", root.parent / "shared" / "seeds"))
    with tempfile.TemporaryDirectory(prefix="cycles-packaging-") as folder:
        dist, venv = pathlib.Path(folder) / "dist", pathlib.Path(folder) / "venv"
        for package in PACKAGES:
            session.run(
                "uv", "build", "-q", "--package", package, "--out-dir", str(dist), external=True
            )  # fmt: skip
        session.run("uv", "venv", "-q", str(venv), external=True)
        wheels = [
            # the AnyAgent quick start runs on the openai backend: any-agent[openai]
            f"runcycles-anyagent[openai] @ {path.as_uri()}"
            if "anyagent" in path.name
            else str(path)
            for path in sorted(dist.glob("*.whl"))
        ]
        session.run(
            "uv", "pip", "install", "-q", "--python", str(venv / "bin" / "python"), *wheels,
            external=True,
        )  # fmt: skip
        session.chdir(folder)
        check = root / "tests-integration" / "packaging_check.py"
        readme = seeds / "runcycles-openai-agents-README.txt"
        session.run(str(venv / "bin" / "python"), str(check), str(readme), external=True)
        check = root / "tests-integration" / "packaging_check_anyagent.py"
        guide = seeds / "guide-anyagent-integration.txt"
        session.run(str(venv / "bin" / "python"), str(check), str(guide), external=True)
        langchain = root / "tests-integration" / "packaging_check_langchain.py"
        page = root / "docs" / "langchain.md"
        session.run(str(venv / "bin" / "python"), str(langchain), str(page), external=True)
        session.run(str(venv / "bin" / "cycles"), "demo", "--delay", "0", external=True)
