"""The `fff` command: set up a project, check it, and run campaigns through FireWorks."""

from __future__ import annotations

import functools
import importlib.metadata
import os
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


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean the input is wrong (not fff): shown as one line, not a traceback."""
    from fff_jobs.database import CampaignNotFoundError, RegistryError
    from fff_jobs.reports import NothingToReportError
    from fff_jobs.spec import SpecError
    from fff_jobs.structures import StructureError

    return (
        config.ConfigError,
        SpecError,
        StructureError,
        CampaignNotFoundError,
        RegistryError,
        NothingToReportError,
    )


def clear_errors(command: Command) -> Command:
    """Turn errors in the user's input into one line on stderr and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except config.ConfigError as error:
            typer.echo(f"error: {config.redact(str(error))}", err=True)
            raise typer.Exit(2) from None
        except Exception as error:
            if not isinstance(error, user_errors()):
                raise
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
    uri_env: Annotated[
        str | None,
        typer.Option(
            help="Read the MongoDB URI from this environment variable instead "
            "(keeps a password out of shell history and the process list)"
        ),
    ] = None,
    directory: Annotated[Path, typer.Option(help="Project directory")] = Path("."),
    force: Annotated[bool, typer.Option(help="Overwrite existing configuration files")] = False,
    check: Annotated[bool, typer.Option(help="Check that the server answers first")] = True,
    slurm: Annotated[
        str | None,
        typer.Option(
            help="Write the Slurm qadapter of this worker (gpu or cpu) with the options "
            "below (the rest at their defaults), instead of the database configuration"
        ),
    ] = None,
    cpus_per_task: Annotated[int | None, typer.Option(help="Slurm: CPUs per job")] = None,
    walltime: Annotated[
        str | None, typer.Option(help="Slurm: wall time per job, [days-]hours:minutes:seconds")
    ] = None,
    partition: Annotated[str | None, typer.Option(help="Slurm: partition")] = None,
    account: Annotated[str | None, typer.Option(help="Slurm: account to charge")] = None,
    gres: Annotated[
        str | None, typer.Option(help="Slurm, GPU worker: GPU request (default gpu:1; '' none)")
    ] = None,
) -> None:
    """Write the project's configuration (embedded store or MongoDB server) or a Slurm qadapter."""
    queue = {"cpus_per_task": cpus_per_task, "walltime": walltime, "partition": partition,
             "account": account, "gres": gres}  # fmt: skip
    if slurm is not None or any(value is not None for value in queue.values()):
        adapter = _write_slurm_adapter(directory, slurm, uri or uri_env, force, queue)
        typer.echo(f"wrote {adapter}")
        return
    for path in _write_database_configuration(directory, uri, uri_env, force, check):
        typer.echo(f"wrote {path}")
    typer.echo("now run: source fw_config/env.sh   (or source .venv/bin/activate)")


def _write_database_configuration(
    directory: Path, uri: str | None, uri_env: str | None, force: bool, check: bool
) -> list[Path]:
    if uri_env is not None:
        if uri is not None:
            raise config.ConfigError("give --uri or --uri-env, not both")
        uri = os.environ.get(uri_env)
        if not uri:
            raise config.ConfigError(f"environment variable {uri_env} is not set (or empty)")
    return project_files.write_configuration(directory.resolve(), uri, force=force, check=check)


def _write_slurm_adapter(
    directory: Path, worker: str | None, uri: str | None, force: bool, queue: dict
) -> Path:
    if worker is None:
        raise config.ConfigError("Slurm options need --slurm gpu or --slurm cpu (which adapter)")
    if uri is not None:
        raise config.ConfigError("give --slurm or --uri/--uri-env, one per `fff init`")
    settings = project_files.slurm_settings(worker, **queue)
    return project_files.write_slurm_adapter(directory.resolve(), worker, settings, force)


# A live update holds a workflow's lock, or leaves a new Firework in no workflow, for
# well under this: what stays so this long (and unchanged) was left by a dead worker.
OBSERVE_SECS = 5


def campaign_violations(campaign_id: str, damage=None) -> list[str]:
    """What breaks the campaign's invariants now (see fff_jobs/invariants.py)."""
    from fff_jobs.invariants import check_campaign
    from fff_jobs.repair import inspect

    if damage is None:
        damage = inspect(config.load_launchpad(), OBSERVE_SECS)
    return check_campaign(config.project_database(), campaign_id, damage).violations


def broken(launchpad, campaign_id: str | None) -> list[str]:
    """What is damaged in FireWorks' records, and what breaks the campaign's invariants."""
    from fff_jobs.repair import inspect

    damage = inspect(launchpad, OBSERVE_SECS)
    problems = damage.describe()
    if campaign_id is None:
        return problems
    own = damage.describe(f"{campaign_id} ")
    violations = campaign_violations(campaign_id, damage)
    return [line for line in problems if line not in own] + [
        f"{campaign_id}: {line}" for line in violations
    ]


@app.command()
@clear_errors
def doctor(
    campaign: Annotated[
        str | None, typer.Argument(help="Campaign id: also check that it can finish")
    ] = None,
) -> None:
    """Check the database, stores, versions and waiting work; with an id, a campaign's invariants.

    Exits with status 1 when FireWorks' records are damaged or an invariant is broken.
    """
    project = config.activate()
    mode = "embedded" if project.embedded_file else "mongodb"
    typer.echo(f"project     {project.directory} ({mode} store)")
    for package in ("fff-jobs", "fireworks", "jobflow", "mace-torch", "torch", "ase", "tblite"):
        typer.echo(f"{package:<11} {importlib.metadata.version(package)}")
    settings = config.read_yaml(project.launchpad_file)
    launchpad = config.load_launchpad()
    typer.echo(f"database    {config.describe_database(settings)}: reachable")
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
    problems = broken(launchpad, campaign)
    for line in problems:
        typer.echo(f"broken      {line}")
    if problems:
        typer.echo("run `fff recover` (`fff recover --expire 0` once no worker runs)", err=True)
        raise typer.Exit(1)
    typer.echo(
        "invariants  " + (f"{campaign}: every one holds" if campaign else "FireWorks: intact")
    )


@app.command()
@clear_errors
def demo(
    run: Annotated[bool, typer.Option("--run/--no-run", help="Run it here once submitted")] = True,
) -> None:
    """Submit the plumbing demo (GPU job, CPU detour, GPU addition) and run it here."""
    config.activate()
    from fff_jobs.demo import demo_flow
    from fff_jobs.workers import run_until_done, submit

    ids = submit(demo_flow())
    typer.echo(f"submitted demo workflow: Fireworks {sorted(ids.values())}")
    if run:
        run_until_done()
        states = config.load_launchpad().get_wf_by_fw_id(min(ids.values())).fw_states
        typer.echo(f"demo finished: {len(states)} Fireworks, states {sorted(set(states.values()))}")


@app.command("export-model")
@clear_errors
def export_model(
    campaign: Annotated[str, typer.Argument(help="Campaign id")],
    output: Annotated[Path, typer.Argument(help="Directory to write the .model files to")],
    generation: Annotated[
        int | None, typer.Option(help="Generation; default: the current one")
    ] = None,
    member: Annotated[int | None, typer.Option(help="Member index; default: all members")] = None,
) -> None:
    """Write committee members as mace .model files (MACECalculator, mace_eval_configs)."""
    config.activate()
    from fff_jobs.committee import export_model_files

    paths = export_model_files(config.project_database(), campaign, generation, member, output)
    for path in paths:
        typer.echo(f"wrote {path}")


EMBEDDED_WARNING = (
    "embedded store: this process holds the whole database and writes it to {file} when it "
    "ends. Run nothing else on this project meanwhile; if this process is killed, everything "
    "since it started is lost and its jobs run again next time (use a MongoDB server for real "
    "campaigns: fff init --uri ...)."
)


EMBEDDED_RECOVERY = (
    "embedded store: a killed process never wrote {file}, so its jobs are READY again, not "
    "lost: run the workers again. Its job outputs stay in .fff/jobstore and are replaced."
)


@app.command()
@clear_errors
def submit(
    spec_file: Annotated[Path, typer.Argument(help="Campaign spec (YAML)")],
    to_file: Annotated[
        Path | None,
        typer.Option(
            help="Write the campaign's first workflow to this FireWorks file (yaml or json) "
            "instead; `lpad add FILE` then starts the campaign"
        ),
    ] = None,
) -> None:
    """Add a campaign to the LaunchPad and print its id; workers then run it."""
    from fff_jobs.spec import CampaignSpec

    spec = CampaignSpec.from_yaml(spec_file)
    if to_file is not None:
        from fff_jobs.jobs import write_workflow_file

        campaign_id = write_workflow_file(spec, to_file)
        typer.echo(f"wrote {to_file}: `lpad add {to_file}` starts campaign {campaign_id}", err=True)
        typer.echo(campaign_id)
        return
    project = config.activate()
    from fff_jobs.jobs import submit_campaign

    campaign_id = submit_campaign(spec)
    if project.embedded_file:
        typer.echo("note: embedded store: run one worker at a time (`fff run` does).", err=True)
    typer.echo(campaign_id)


@app.command()
@clear_errors
def run(
    spec_file: Annotated[Path, typer.Argument(help="Campaign spec (YAML)")],
    category: Annotated[
        str | None, typer.Option(help="Run only jobs of this worker category")
    ] = None,
) -> None:
    """Submit a campaign and run its jobs in this process until it is complete (the quick start)."""
    project = config.activate()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from fff_jobs import database as db
    from fff_jobs.jobs import submit_campaign
    from fff_jobs.spec import CampaignSpec
    from fff_jobs.workers import load_fworker, run_until_done

    spec = CampaignSpec.from_yaml(spec_file)
    if category:
        load_fworker(project.fworker_file(category))
    if project.embedded_file:
        typer.echo(EMBEDDED_WARNING.format(file=project.embedded_file), err=True)
    campaign_id = submit_campaign(spec)
    log_file = project.directory / ".fff" / "launches" / f"{campaign_id}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    typer.echo(f"campaign {campaign_id} (job output: {log_file})")
    database = config.project_database()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    terminal = Console(file=os.fdopen(os.dup(1), "w"))
    with Progress(*columns, console=terminal) as progress:
        task = progress.add_task("reference calculations", total=spec.num_to_run)

        def update() -> None:
            campaign = db.get_campaign(database, campaign_id)
            generation = len(campaign.generations) - 1
            progress.update(
                task,
                completed=campaign.budget.spent,
                description=f"generation {generation}, reference calculations",
            )

        run_until_done(category, on_rocket=update, log_file=log_file)
    print_status(campaign_id)


def print_status(campaign_id: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from fff_jobs.reports import campaign_status

    status = campaign_status(config.project_database(), campaign_id)
    table = Table(title=f"campaign {campaign_id}", show_header=False)
    generation = status["generation"]
    rate = status["audit_pass_rate"]
    rows = [
        (
            "status",
            status["status"] + (f" ({status['stop_reason']})" if status["stop_reason"] else ""),
        ),
        ("reference calculations", f"{status['reference_spent']} / {status['budget']}"),
        ("failed calculations", str(status["failed_calculations"])),
        ("current generation", "none yet" if generation is None else str(generation.generation)),
        ("training running", "yes" if status["training_running"] else "no"),
    ]
    if generation is not None:
        if generation.validation_frames == 0:
            rows.append(("validation errors", "none: every result trained this generation"))
        else:
            force = generation.validation_force_mae
            energy = 1000 * generation.validation_energy_mae_per_atom
            rows.append(("validation force MAE", f"{force:.4f} eV/Å"))
            rows.append(("validation energy MAE", f"{energy:.2f} meV/atom"))
        rows.append(("training set", f"{generation.training_set_size} frames"))
    errors = ", ".join(f"{1000 * e:.2f}" for e in status["recent_audit_errors"] if e is not None)
    rows += [
        (
            "live trajectories",
            f"{status['live_trajectories']} ({status['retired_trajectories']} retired)",
        ),
        ("audits passed", "none yet" if rate is None else f"{rate:.0%} of {status['audits']}"),
        ("recent audit errors", f"{errors} meV/atom" if errors else "none yet"),
        ("calibration", describe_calibration(status["calibration"])),
    ]
    for category, states in sorted(status["jobs"].items()):
        counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(states.items()))
        rows.append((f"jobs ({category})", counts))
    rows += [("problem", reason) for reason in status["problems"]]
    violations = campaign_violations(campaign_id)
    rows += [("stuck", line) for line in violations]
    rows.append(
        (
            "invariants",
            f"{len(violations)} broken: fff doctor {campaign_id}" if violations else "all hold",
        )
    )
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)


def describe_calibration(summary: dict) -> str:
    """One line: how well the committee's uncertainty ranked the errors the reference found."""
    if not summary["frames"]:
        return "no computed frame with a prediction yet"
    correlation = summary["rank_correlation"]
    ranked = "n/a" if correlation is None else f"{correlation:.2f}"
    return (
        f"{summary['frames']} frames, rank correlation {ranked}; median force deviation "
        f"{summary['median_force_deviation']:.3f} vs error {summary['median_force_error']:.3f} eV/Å"
    )


@app.command()
@clear_errors
def status(
    campaign: Annotated[str | None, typer.Argument(help="Campaign id; omit to list them")] = None,
) -> None:
    """Budget spent, current generation and its errors, trajectories, audits and jobs."""
    config.activate()
    from fff_jobs import database as db

    if campaign is not None:
        print_status(campaign)
        return
    campaigns = db.list_campaigns(config.project_database())
    if not campaigns:
        typer.echo("no campaigns yet: fff submit workflows/water_xtb.yaml")
    for document in campaigns:
        budget = document.budget
        typer.echo(
            f"{document.id:<24} {document.status:<9} "
            f"{budget.spent}/{budget.num_to_run} reference calculations, "
            f"{len(document.generations)} generations"
        )


@app.command()
@clear_errors
def report(
    campaign: Annotated[str, typer.Argument(help="Campaign id")],
    output: Annotated[Path, typer.Option(help="Directory for the CSV and PNG")] = Path("."),
    holdout: Annotated[
        Path | None,
        typer.Option(help="Labelled frames (extxyz/ASE db) to score every generation on"),
    ] = None,
) -> None:
    """Write the learning curve (validation and audit errors against budget) as CSV and PNG."""
    config.activate()
    from fff_jobs.reports import read_holdout, write_report

    frames = read_holdout(holdout) if holdout else None
    for path in write_report(config.project_database(), campaign, output, frames):
        typer.echo(f"wrote {path}")


@app.command()
@clear_errors
def export(
    campaign: Annotated[str, typer.Argument(help="Campaign id")],
    output: Annotated[Path, typer.Option(help="Directory for the files")] = Path("."),
) -> None:
    """Write the training set as extxyz and as an ASE database, provenance in `info`."""
    config.activate()
    from fff_jobs.reports import export_training_set

    for path in export_training_set(config.project_database(), campaign, output):
        typer.echo(f"wrote {path}")


LOCK_WAIT_SECS = 30


@app.command()
@clear_errors
def recover(
    expire: Annotated[
        int | None,
        typer.Option(
            help="Seconds without a ping after which a running job is lost "
            "(default: RUN_EXPIRATION_SECS of FW_config.yaml)"
        ),
    ] = None,
    lock_wait: Annotated[
        float,
        typer.Option(
            help="Seconds a workflow must stay locked (or a Firework in no workflow) unchanged "
            "to count as left by a dead worker; at most --expire"
        ),
    ] = LOCK_WAIT_SECS,
) -> None:
    """Repair what dead workers left: FireWorks' records, lost jobs, claims, stuck trajectories.

    Exits with status 1 while anything is left that it could not repair.
    """
    project = config.activate()
    from fireworks.fw_config import RUN_EXPIRATION_SECS

    from fff_jobs.recovery import recover as recover_campaigns

    if project.embedded_file:
        typer.echo(EMBEDDED_RECOVERY.format(file=project.embedded_file), err=True)
    expiration = RUN_EXPIRATION_SECS if expire is None else expire
    report = recover_campaigns(
        config.load_launchpad(), config.project_database(), expiration, lock_wait
    )
    for line in report.lines:
        typer.echo(line)
    if report.unrepaired:
        typer.echo("left to repair:", err=True)
        for line in report.unrepaired:
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(1)
    typer.echo("nothing left to repair")
