"""The `fff` command: set up a project, check it, and run campaigns through FireWorks."""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from fff_jobs import config, project_files

app = typer.Typer(
    help="Active learning of MACE committees as a self-growing FireWorks workflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
Command = TypeVar("Command", bound=Callable)


def clear_errors(command: Command) -> Command:
    """Turn configuration errors into one line on stderr and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except config.ConfigError as error:
            typer.echo(f"error: {config.redact(str(error))}", err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@clear_errors
def init(
    uri: Annotated[
        str | None,
        typer.Option(help="MongoDB URI (mongodb:// or mongodb+srv://); omit: embedded store"),
    ] = None,
    directory: Annotated[Path, typer.Option(help="Project directory")] = Path("."),
    force: Annotated[bool, typer.Option(help="Overwrite existing configuration files")] = False,
    check: Annotated[bool, typer.Option(help="Check that the server answers first")] = True,
) -> None:
    """Write the project's configuration for the embedded store or a MongoDB server."""
    written = project_files.write_configuration(directory.resolve(), uri, force=force, check=check)
    for path in written:
        typer.echo(f"wrote {path}")
    typer.echo("now run: source fw_config/env.sh   (or source .venv/bin/activate)")


@app.command()
@clear_errors
def doctor() -> None:
    """Check the database, stores and versions, and which worker categories have work waiting."""
    project = config.activate()
    mode = "embedded" if project.embedded_file else "mongodb"
    typer.echo(f"project     {project.directory} ({mode} store)")
    for package in ("fff-jobs", "fireworks", "jobflow", "mace-torch", "torch", "ase", "tblite"):
        typer.echo(f"{package:<11} {importlib.metadata.version(package)}")
    settings = config.read_yaml(project.launchpad_file)
    launchpad = config.load_launchpad()
    typer.echo(f"database    {config.describe_server(settings)}/{launchpad.name}: reachable")
    store = config.load_job_store()
    store.connect()
    typer.echo(f"job store   {type(store.docs_store).__name__}: {store.docs_store.count()} outputs")
    from fff_jobs.workers import load_fworker, waiting_work

    for path in sorted(project.directory.glob("fw_config/my_fworker_*.yaml")):
        worker = load_fworker(path)
        typer.echo(f"worker      {path.name}: category {worker.category!r}")
    for category, states in waiting_work(launchpad).items():
        counts = ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
        typer.echo(f"work        {category}: {counts}")


@app.command()
@clear_errors
def demo(
    run: Annotated[bool, typer.Option("--run/--no-run", help="Run it here once submitted")] = True,
) -> None:
    """Submit the plumbing demo (GPU job, CPU detour, GPU addition) and run it here."""
    config.activate()
    from fff_jobs.demo import demo_flow
    from fff_jobs.workers import run_here, submit

    ids = submit(demo_flow())
    typer.echo(f"submitted demo workflow: Fireworks {sorted(ids.values())}")
    if run:
        run_here()
        states = config.load_launchpad().get_wf_by_fw_id(min(ids.values())).fw_states
        typer.echo(f"demo finished: {len(states)} Fireworks, states {sorted(set(states.values()))}")
