"""The campaign: its jobs, and the steering that decides which job adds which.

Submitting a campaign adds one job (ingest). From then on every job adds the next
ones through jobflow ``Response`` additions and detours, so the FireWorks
workflow grows at run time:

- ingest -> train generation 0 (one GPU job per member);
- the last member of a generation -> the first segments (after generation 0),
  the next training round if enough data arrived, or the end of the campaign;
- MD segment -> its audit (CPU detour, high priority) and, once enough frames
  are pooled, an inference-and-selection job (GPU);
- audit -> the trajectory's next segment (continue or restart);
- inference-and-selection -> reference calculations (CPU), in batches;
- reference results -> the next training generation every ``retrain_freq``.

Coordination goes through atomic updates in :mod:`fff_jobs.database`: a re-run of
any job finds its work done or claimed and adds nothing twice. Every claim names
the job that took it (its jobflow uuid, the same in every re-run) and when. A job
killed at any point is re-run by ``lpad detect_lostruns --rerun`` (or `fff
recover`): the re-run finds what the dead run stored, gets its own claims back,
and adds the jobs the dead run never handed over (jobs are named uniquely, and
:func:`_grow` leaves out those the LaunchPad holds already). Dynamically added
jobs get ids, never data: jobflow refuses references from them to other jobs,
and data inlined into specs would bloat the workflow documents.
"""

from __future__ import annotations

import math
import time
import uuid
import zlib

from jobflow import Flow, Job, Response, job

from fff_jobs import database as db
from fff_jobs.calibration import Prediction, calibration_record
from fff_jobs.config import project_database
from fff_jobs.reference import ReferenceResult, compute_references
from fff_jobs.routing import route
from fff_jobs.spec import CampaignSpec
from fff_jobs.structures import Frame

# Heavy science modules (torch, mace) are imported inside the GPU jobs only, so that
# CPU workers running audits and reference calculations start in a second, not ten.


def new_campaign_id(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def campaign_spec(campaign: dict) -> CampaignSpec:
    return CampaignSpec.model_validate(campaign["spec"])


def _named(work: Job, name: str) -> Job:
    work.name = name
    return work


def this_job() -> str:
    """The running job's uuid, which owns the claims it takes; a re-run has the same one."""
    from jobflow import CURRENT_JOB

    return CURRENT_JOB.job.uuid if CURRENT_JOB.job is not None else "no-job"


# --- which job adds which ---


def train_jobs(campaign_id: str, spec: CampaignSpec, generation: int) -> list[Job]:
    workers = spec.workers
    return [
        route(
            _named(
                train_member(campaign_id, generation, member),
                f"{campaign_id} train g{generation} m{member}",
            ),
            workers.gpu_category,
            workers.training_priority,
        )
        for member in range(spec.training.committee_size)
    ]


def segment_job(campaign_id: str, spec: CampaignSpec, trajectory_id: str, segment: int) -> Job:
    work = md_segment(campaign_id, trajectory_id, segment)
    name = f"{campaign_id} segment {trajectory_id.rsplit('-', 1)[1]} s{segment}"
    return route(_named(work, name), spec.workers.gpu_category, spec.workers.sampling_priority)


def audit_job(campaign_id: str, spec: CampaignSpec, trajectory_id: str, segment: int) -> Job:
    work = audit_segment(campaign_id, trajectory_id, segment)
    name = f"{campaign_id} audit {trajectory_id.rsplit('-', 1)[1]} s{segment}"
    return route(_named(work, name), spec.workers.cpu_category, spec.workers.audit_priority)


def selection_job(campaign_id: str, spec: CampaignSpec, number: int) -> Job:
    work = infer_and_select(campaign_id, number)
    name = f"{campaign_id} select {number}"
    return route(_named(work, name), spec.workers.gpu_category, spec.workers.inference_priority)


def calculation_jobs(
    campaign_id: str, spec: CampaignSpec, number: int, frame_ids: list[str]
) -> list[Job]:
    size = spec.calculations_per_job
    batches = [frame_ids[start : start + size] for start in range(0, len(frame_ids), size)]
    return [
        route(
            _named(calculate(campaign_id, batch), f"{campaign_id} calculate {number}.{index}"),
            spec.workers.cpu_category,
            spec.workers.calculation_priority,
        )
        for index, batch in enumerate(batches)
    ]


def next_training(database, campaign_id: str, spec: CampaignSpec) -> list[Job]:
    """The next generation's members, if enough new data arrived and no round is running.

    Once the budget is spent, any new result is enough: the last generation is
    trained on everything the campaign paid for.
    """
    campaign = db.get_campaign(database, campaign_id)
    required = 1 if campaign["budget"]["left"] == 0 else spec.retrain_freq
    generation = db.claim_training_round(database, campaign_id, required, this_job())
    return [] if generation is None else train_jobs(campaign_id, spec, generation)


def maybe_finish(database, campaign_id: str) -> None:
    """Complete the campaign once the budget is spent, every result stored and trained on."""
    campaign = db.get_campaign(database, campaign_id)
    stored = db.count_results(database, campaign_id, source={"$ne": "initial"})
    results = db.count_results(database, campaign_id, success=True)
    trained = results <= campaign["training"]["trained_results"]
    if (
        campaign["budget"]["left"] == 0
        and stored >= campaign["budget"]["spent"]
        and not campaign["training"]["running"]
        and trained
    ):
        db.finish_campaign(database, campaign_id, "reference budget spent")


def keep_going(database, campaign_id: str, spec: CampaignSpec) -> list[Job]:
    """Work for a campaign whose trajectories have all retired: its pooled frames, or a new round.

    Without it, a campaign whose every trajectory failed its audits too often would
    wait for frames no segment will pool. A new generation revives the retired
    trajectories (see _follow_up_generation); with nothing new to learn from, the
    campaign ends and says why.
    """
    campaign = db.get_campaign(database, campaign_id)
    if (
        campaign["status"] != db.RUNNING
        or campaign["training"]["running"]
        or campaign["selection"]["pending"]
        or db.count_trajectories(database, campaign_id, "sampling")
        or db.count_selected_uncalculated(database, campaign_id) > 0
    ):
        return []
    if db.count_pooled(database, campaign_id):
        number = db.request_selection(database, campaign_id, this_job())
        return [] if number is None else [selection_job(campaign_id, spec, number)]
    generation = db.claim_training_round(database, campaign_id, 1, this_job())
    if generation is not None:
        return train_jobs(campaign_id, spec, generation)
    db.finish_campaign(database, campaign_id, "every trajectory retired, nothing new to learn")
    return []


def _revive_trajectories(database, campaign_id: str, spec: CampaignSpec) -> list[Job]:
    """Next segments of the trajectories a new generation brings back from retirement."""
    if db.get_campaign(database, campaign_id)["budget"]["left"] == 0:
        return []
    return [
        segment_job(campaign_id, spec, trajectory["_id"], trajectory["segments_completed"])
        for trajectory in db.revive_trajectories(database, campaign_id)
    ]


def next_selection(database, campaign_id: str, spec: CampaignSpec) -> list[Job]:
    """An inference-and-selection job once enough frames are pooled (one waiting at most)."""
    if db.count_pooled(database, campaign_id) < spec.inference_chunk:
        return []
    number = db.request_selection(database, campaign_id, this_job())
    return [] if number is None else [selection_job(campaign_id, spec, number)]


def _grow(
    database,
    campaign_id: str,
    spec: CampaignSpec,
    output: dict,
    additions: list[Job],
    detour: Job | None = None,
) -> Response:
    """The job's output and the jobs it adds, less those the LaunchPad holds already.

    A job re-run after a crash proposes again what it would have added; only what
    the dead run never handed over is new.
    """
    from fff_jobs.workers import grow

    proposed = [*additions, *([detour] if detour else [])]
    existing = db.existing_job_names(database, [work.name for work in proposed])
    return grow(
        output,
        [work for work in additions if work.name not in existing],
        detour if detour and detour.name not in existing else None,
        max_workflow_jobs=spec.workers.max_workflow_jobs,
        workflow_name=workflow_name(campaign_id),
    )


def workflow_name(campaign_id: str) -> str:
    """The name of every FireWorks workflow of a campaign."""
    return f"fff campaign {campaign_id}"


# --- submitting ---


def start_flow(campaign_id: str, spec: CampaignSpec) -> Flow:
    """The workflow as submitted: one ingest job; everything else grows from it."""
    work = _named(ingest(campaign_id), f"{campaign_id} ingest")
    route(work, spec.workers.cpu_category, spec.workers.ingest_priority)
    return Flow([work], name=workflow_name(campaign_id))


def submit_campaign(spec: CampaignSpec) -> str:
    """Check the starting data, record the campaign and add its workflow; returns its id."""
    from fff_jobs.workers import submit

    load_starting_data(spec)
    database = project_database()
    campaign_id = new_campaign_id(spec.name)
    db.create_campaign(database, campaign_id, spec.name, spec.model_dump(mode="json"))
    submit(start_flow(campaign_id, spec))
    return campaign_id


# --- the jobs ---


def load_starting_data(spec: CampaignSpec) -> tuple[list, list]:
    """Starting structures and the frames labelled for generation 0, checked."""
    from fff_jobs import structures

    system = spec.system
    if system.water_clusters is not None:
        search_space = structures.water_search_space(system.water_clusters)
        return search_space, []
    search_space = structures.read_structures(system.starting_structures, system.structures)
    initial = structures.read_structures(system.initial_data, system.structures)
    return search_space, initial


def _initial_frames(spec: CampaignSpec, search_space: list) -> list:
    from fff_jobs import structures
    from fff_jobs.reference import make_calculator

    if spec.system.water_clusters is None:
        return load_starting_data(spec)[1]
    return structures.initial_frames(
        search_space, spec.system.water_clusters, spec.md, make_calculator(spec.reference)
    )


def result_document(
    result: ReferenceResult,
    campaign_id: str,
    result_id: str,
    source: str,
    prediction: dict | None = None,
    **provenance,
) -> dict:
    """What is stored of one reference calculation: the result, its source and provenance.

    With the committee's ``prediction`` of the frame, a successful result also stores
    its calibration record: the predicted uncertainty beside the actual error.
    """
    document = {
        "_id": result_id,
        "campaign_id": campaign_id,
        "source": source,
        **provenance,
        **result.model_dump(mode="json"),
    }
    if prediction is not None and result.success:
        record = calibration_record(Prediction(**prediction), result.energy, result.forces)
        document["calibration"] = record.model_dump()
    return document


@job
def ingest(campaign_id: str) -> Response:
    """Build the starting structures, label the initial data, and start generation 0."""
    database = project_database()
    spec = campaign_spec(db.get_campaign(database, campaign_id))
    search_space, _ = load_starting_data(spec)
    db.store_starting_structures(
        database, campaign_id, [Frame.from_atoms(atoms).model_dump() for atoms in search_space]
    )
    frames = _initial_frames(spec, search_space)
    ids = [f"{campaign_id}-initial-{index:05d}" for index in range(len(frames))]
    missing = [
        (i, atoms)
        for i, atoms in zip(ids, frames, strict=True)
        if not db.find_reference_result(database, i)
    ]
    results = compute_references([atoms for _, atoms in missing], spec.reference)
    for (result_id, _), result in zip(missing, results, strict=True):
        db.store_reference_result(
            database, result_document(result, campaign_id, result_id, "initial")
        )
    succeeded = db.count_results(database, campaign_id, source="initial", success=True)
    if succeeded < 2:
        raise ValueError(
            f"campaign {campaign_id}: only {succeeded} of {len(frames)} initial frames were "
            "computed by the reference; check the reference settings and starting structures"
        )
    generation = db.claim_training_round(database, campaign_id, 1, this_job())
    additions = [] if generation is None else train_jobs(campaign_id, spec, generation)
    return _grow(
        database,
        campaign_id,
        spec,
        {"initial_frames": len(frames), "succeeded": succeeded},
        additions,
    )


def _training_frames(database, campaign_id: str, generation: int) -> tuple[list, list[str]]:
    """The generation's training snapshot as labelled Atoms, and each frame's result id."""
    fields = ReferenceResult.model_fields
    documents = db.training_results(database, campaign_id, generation)
    frames = [
        ReferenceResult.model_validate({key: doc[key] for key in fields if key in doc}).to_atoms()
        for doc in documents
    ]
    return frames, [doc["_id"] for doc in documents]


def member_split(spec: CampaignSpec, member: int, result_ids: list[str]):
    """A member's training and validation indices: fixed per result for the whole campaign."""
    from fff_jobs.training import fixed_split, split_key

    training = spec.training
    key = split_key(training.seed, member)
    return fixed_split(result_ids, key, training.split, training.validation_fraction)


def _train_and_register(
    database, campaign_id: str, spec: CampaignSpec, generation: int, member: int
) -> dict:
    """Train a member (again with a new seed while it diverges, up to max_attempts); register it."""
    from fff_jobs.training import member_seed, package_versions, training_set_hash
    from fff_jobs.training import train_member as train

    frames, result_ids = _training_frames(database, campaign_id, generation)
    parent_document = db.find_member(database, campaign_id, generation - 1, member)
    parent = None
    if spec.training.warm_start and parent_document is not None:
        parent = (parent_document["hyperparameters"], db.load_weights(database, parent_document))
    split = member_split(spec, member, result_ids)
    for attempt in range(spec.training.max_attempts):
        seed = member_seed(spec.training.seed, generation, member, attempt)
        trained = train(frames, spec.model, spec.training, seed, parent, split)
        diverged = _divergence(trained.history)
        if diverged is None:
            break
    record = {
        "campaign_id": campaign_id,
        "generation": generation,
        "member": member,
        "committee_size": spec.training.committee_size,
        "hyperparameters": trained.hyperparameters,
        "seed": seed,
        "attempts": attempt + 1,
        "training_set_hash": training_set_hash(frames),
        "training_set_size": len(frames),
        "validation_set_size": len(split[1]),
        "parent_model": parent_document["_id"] if parent else None,
        "metrics": trained.metrics,
        "epochs": trained.epochs,
        "best_epoch": trained.best_epoch,
        "wall_time": trained.wall_time,
        "device": trained.device,
        "versions": package_versions(),
        "diverged": diverged,
    }
    document, _ = db.register_member(database, record, trained.model.state_dict())
    return document


def _divergence(history: list[dict]) -> str | None:
    """Why a member's training diverged (no finite validation loss in any epoch), or None.

    A member that still diverges after its last attempt is registered all the same,
    with the weights it started from (its parent's, or fresh ones) and this reason, so
    that its round completes and the campaign goes on; it takes no part in sampling,
    selection or the generation's errors, and `fff status` shows it as a problem.
    """
    if any(math.isfinite(entry["validation_loss"]) for entry in history):
        return None
    return f"training diverged: validation loss {history[-1]['validation_loss']} in every epoch"


def _generation_errors(
    database, campaign_id: str, spec: CampaignSpec, generation: int
) -> dict[str, float]:
    """The committee's out-of-sample errors: each frame predicted by the members that never
    trained on it (their mean), over the generation's training snapshot."""
    import mace  # noqa: F401  (mace before e3nn)

    from fff_jobs.committee import load_committee, out_of_sample_errors

    documents, models = load_committee(database, campaign_id, generation, healthy=True)
    frames, result_ids = _training_frames(database, campaign_id, generation)
    held_out = [set(member_split(spec, d["member"], result_ids)[1]) for d in documents]
    return out_of_sample_errors(models, frames, held_out, spec.inference_batch_size)


def _follow_up_generation(
    database, campaign_id: str, spec: CampaignSpec, generation: int
) -> list[Job]:
    """What the end of a training round adds: first segments, next round, or the end."""
    documents = db.committee_documents(database, campaign_id, generation)
    campaign = db.get_campaign(database, campaign_id)
    errors = _generation_errors(database, campaign_id, spec, generation)
    db.record_generation(
        database,
        campaign_id,
        {
            "generation": generation,
            "training_set_size": documents[0]["training_set_size"],
            "reference_spent": campaign["budget"]["spent"],
            "healthy_members": sum(not d.get("diverged") for d in documents),
            **errors,
            "published_at": db.now(),
        },
    )
    target, force_mae = spec.target_force_error, errors["validation_force_mae"]
    if target is not None and force_mae <= target:
        db.finish_campaign(
            database,
            campaign_id,
            f"validation force error {force_mae:.4f} eV/A reached the target {target}",
        )
        return []
    if generation == 0:
        additions = _start_trajectories(database, campaign_id, spec)
    else:
        additions = _revive_trajectories(database, campaign_id, spec)
    additions += next_training(database, campaign_id, spec)
    maybe_finish(database, campaign_id)
    return additions + keep_going(database, campaign_id, spec)


def trajectory_starts(
    sizes: list[int], trajectories: int, temperatures: list[float]
) -> list[tuple[int, float]]:
    """Each trajectory's starting structure (an index into ``sizes``) and temperature.

    Trajectory i takes the next size in turn (smallest first), the next structure of
    that size, and a temperature of the ladder shifted every round of sizes, so every
    size runs at every temperature once there are enough trajectories.
    """
    by_size: dict[int, list[int]] = {}
    for index, size in enumerate(sizes):
        by_size.setdefault(size, []).append(index)
    groups = [by_size[size] for size in sorted(by_size)]
    starts = []
    for trajectory in range(trajectories):
        round_, group = divmod(trajectory, len(groups))
        structure = groups[group][round_ % len(groups[group])]
        temperature = temperatures[(trajectory + round_) % len(temperatures)]
        starts.append((structure, temperature))
    return starts


def _start_trajectories(database, campaign_id: str, spec: CampaignSpec) -> list[Job]:
    """Create the trajectories and their first segments (again, for a re-run: see _grow)."""
    starts = db.starting_structures(database, campaign_id)
    sizes = [len(start["frame"]["numbers"]) for start in starts]
    jobs = []
    plan = trajectory_starts(sizes, spec.trajectories, spec.md.temperatures)
    for index, (structure, temperature) in enumerate(plan):
        start = starts[structure]
        trajectory_id = f"{campaign_id}-t{index:03d}"
        db.create_trajectory(
            database,
            {
                "_id": trajectory_id,
                "campaign_id": campaign_id,
                "index": index,
                "temperature": temperature,
                "start_frame": start["frame"],
                "current_frame": start["frame"],
                "run_length": spec.md.run_length,
                "segments_completed": 0,
                "audits_completed": 0,
                "failures": 0,
                "restarts": 0,
                "status": "sampling",
            },
        )
        if db.get_trajectory(database, trajectory_id)["segments_completed"] == 0:
            jobs.append(segment_job(campaign_id, spec, trajectory_id, 0))
    return jobs


@job
def train_member(campaign_id: str, generation: int, member: int) -> Response:
    """Train one committee member on the round's training set and register it."""
    database = project_database()
    spec = campaign_spec(db.get_campaign(database, campaign_id))
    document = db.find_member(database, campaign_id, generation, member)
    if document is None:
        document = _train_and_register(database, campaign_id, spec, generation, member)
    additions = []
    if db.current_generation(database, campaign_id) == generation and db.claim_generation_follow_up(
        database, campaign_id, generation, this_job()
    ):
        additions = _follow_up_generation(database, campaign_id, spec, generation)
    output = {"model_id": document["_id"], "metrics": document["metrics"]}
    return _grow(database, campaign_id, spec, output, additions)


def _sampling_committee(database, campaign_id: str, spec: CampaignSpec):
    """The newest committee's healthy members, the first as an ASE calculator, and its
    generation."""
    import mace  # noqa: F401  (mace before e3nn)
    from mace.calculators import MACECalculator

    from fff_jobs.committee import load_committee
    from fff_jobs.training import resolve_device

    generation = db.current_generation(database, campaign_id)
    device = resolve_device(spec.md.device)
    documents, models = load_committee(database, campaign_id, generation, device=device)
    dtype = documents[0]["hyperparameters"]["dtype"]
    calculator = MACECalculator(models=[models[0]], device=device, default_dtype=dtype)
    return calculator, models, generation


def _segment_seed(trajectory_id: str, segment: int) -> int:
    return zlib.crc32(f"{trajectory_id}/{segment}".encode())


@job
def md_segment(campaign_id: str, trajectory_id: str, segment: int) -> Response:
    """Run one MD segment with the newest model, pool its frames and add its audit."""
    database = project_database()
    campaign = db.get_campaign(database, campaign_id)
    spec = campaign_spec(campaign)
    output = {"repeated": True}
    if db.get_trajectory(database, trajectory_id)["segments_completed"] <= segment:
        if campaign["status"] != db.RUNNING or campaign["budget"]["left"] == 0:
            db.set_trajectory_status(database, trajectory_id, "stopped")
            return Response(output={"stopped": campaign["stop_reason"] or "reference budget spent"})
        output = _run_segment(database, campaign_id, spec, trajectory_id, segment)
    audit = audit_job(campaign_id, spec, trajectory_id, segment)
    return _grow(
        database,
        campaign_id,
        spec,
        output,
        next_selection(database, campaign_id, spec),
        detour=audit,
    )


def _run_segment(
    database, campaign_id: str, spec: CampaignSpec, trajectory_id: str, segment: int
) -> dict:
    """Run the segment, pool its frames and record it; the job's output."""
    from fff_jobs.committee import committee_uncertainty, predict_committee
    from fff_jobs.sampling import run_segment

    trajectory = db.get_trajectory(database, trajectory_id)
    calculator, models, generation = _sampling_committee(database, campaign_id, spec)
    start = Frame.model_validate(trajectory["current_frame"]).to_atoms()
    result = run_segment(
        start,
        calculator,
        spec.md,
        num_steps=trajectory["run_length"],
        seed=_segment_seed(trajectory_id, segment),
        temperature=trajectory.get("temperature"),
        uncertainty=committee_uncertainty(models, spec.uncertainty),
    )
    prediction = None
    if result.final_energy is not None:
        final = predict_committee(models, [result.final_frame.to_atoms()], compute_forces=True)
        prediction = final.frame_prediction(0, generation).model_dump()
    prefix = f"{trajectory_id}-s{segment:04d}"
    db.pool_frames(
        database,
        [
            {
                "_id": f"{prefix}-f{index:03d}",
                "campaign_id": campaign_id,
                "trajectory_id": trajectory_id,
                "segment": segment,
                "generation": generation,
                "frame": frame.model_dump(),
                "sampling_energy": energy,
            }
            for index, (frame, energy) in enumerate(
                zip(result.frames, result.energies, strict=True)
            )
        ],
    )
    summary = {
        "final_frame": result.final_frame.model_dump(),
        "final_energy": result.final_energy,
        "steps": result.steps,
        "flag": result.flag,
        "detail": result.detail,
        "generation": generation,
        "prediction": prediction,
        "temperature": trajectory.get("temperature"),
        "wall_time": result.wall_time,
    }
    completed = db.complete_segment(database, trajectory_id, segment, summary)
    output = {"steps": result.steps, "frames": len(result.frames), "flag": result.flag}
    return output | {"generation": generation, "repeated": not completed}


def _audit_result(
    database, campaign_id: str, spec: CampaignSpec, trajectory: dict, segment: int
) -> dict | None:
    """The stored reference result of a segment's final frame, computed now if need be."""
    result_id = f"{trajectory['_id']}-s{segment:04d}-audit"
    stored = db.find_reference_result(database, result_id)
    if stored is not None:
        return stored
    if not db.claim_budget(database, campaign_id, result_id, this_job()):
        return None
    last = trajectory["last_segment"]
    (result,) = compute_references(
        [Frame.model_validate(last["final_frame"]).to_atoms()], spec.reference
    )
    document = result_document(
        result,
        campaign_id,
        result_id,
        "audit",
        last.get("prediction"),
        trajectory_id=trajectory["_id"],
        segment=segment,
        generation=last["generation"],
    )
    db.store_reference_result(database, document)
    return document


@job
def audit_segment(campaign_id: str, trajectory_id: str, segment: int) -> Response:
    """Compute a segment's final frame with the reference; continue or restart the trajectory."""
    database = project_database()
    spec = campaign_spec(db.get_campaign(database, campaign_id))
    output: dict = {"repeated": True}
    if db.get_trajectory(database, trajectory_id)["audits_completed"] <= segment:
        output = _audit(database, campaign_id, spec, trajectory_id, segment)
    additions = next_training(database, campaign_id, spec)
    trajectory = db.get_trajectory(database, trajectory_id)
    campaign = db.get_campaign(database, campaign_id)
    if (
        trajectory["status"] == "sampling"
        and trajectory["audits_completed"] > segment
        and campaign["status"] == db.RUNNING
        and campaign["budget"]["left"] > 0
    ):
        additions.append(segment_job(campaign_id, spec, trajectory_id, segment + 1))
    maybe_finish(database, campaign_id)
    additions += keep_going(database, campaign_id, spec)
    return _grow(database, campaign_id, spec, output, additions)


def _audit(database, campaign_id: str, spec: CampaignSpec, trajectory_id: str, segment: int):
    """Audit the segment and apply the decision to its trajectory; the job's output."""
    from fff_jobs.sampling import audit_decision, audit_tolerance

    trajectory = db.get_trajectory(database, trajectory_id)
    result = _audit_result(database, campaign_id, spec, trajectory, segment)
    if result is None:
        db.set_trajectory_status(database, trajectory_id, "stopped")
        return {"stopped": "reference budget spent"}
    last = trajectory["last_segment"]
    generations = db.get_campaign(database, campaign_id)["generations"]
    errors = {g["generation"]: g.get("validation_energy_mae_per_atom") for g in generations}
    prediction = last.get("prediction")
    decision = audit_decision(
        prediction["energy"] if prediction else last["final_energy"],
        result["energy"] if result["success"] else None,
        len(last["final_frame"]["numbers"]),
        last["flag"],
        trajectory["run_length"],
        audit_tolerance(spec.audit, errors.get(last["generation"])),
        spec.audit,
    )
    passed = decision.action == "continue"
    failures = 0 if passed else trajectory["failures"] + 1
    retired = failures >= spec.max_trajectory_failures
    changes = {
        "current_frame": last["final_frame"] if passed else trajectory["start_frame"],
        "run_length": decision.run_length,
        "failures": failures,
        "restarts": trajectory["restarts"] + (not passed),
        "status": "retired" if retired else "sampling",
        "last_audit": decision.model_dump(),
    }
    db.annotate_audit(database, result["_id"], decision.model_dump())
    completed = db.complete_audit(database, trajectory_id, segment, changes)
    return {"decision": decision.model_dump(), "retired": retired, "repeated": not completed}


@job
def infer_and_select(campaign_id: str, number: int) -> Response:
    """Score the pooled frames with the committee and pick the next batch to calculate."""
    database = project_database()
    spec = campaign_spec(db.get_campaign(database, campaign_id))
    selection_id = db.selection_id(campaign_id, number)
    output: dict = {"repeated": True}
    if db.get_selection(database, selection_id) is None:
        output = _infer_and_select(database, campaign_id, spec, selection_id)
    selected = db.get_selection(database, selection_id)["selected"]
    db.release_selection(database, campaign_id, number)
    additions = calculation_jobs(campaign_id, spec, number, selected)
    additions += next_selection(database, campaign_id, spec)
    additions += keep_going(database, campaign_id, spec)
    return _grow(database, campaign_id, spec, output, additions)


def _infer_and_select(database, campaign_id: str, spec: CampaignSpec, selection_id: str) -> dict:
    """Claim the pooled frames, score them, store the selection; the job's output."""
    started = time.perf_counter()
    frames = db.claim_pooled_frames(database, campaign_id, selection_id)
    batch_size = min(
        spec.selection.batch_size, db.get_campaign(database, campaign_id)["budget"]["left"]
    )
    generation = db.current_generation(database, campaign_id)
    selected, uncertainties, predictions = [], {}, {}
    if frames and batch_size > 0:
        selected, uncertainties, predictions = _select(
            database, campaign_id, spec, frames, batch_size
        )
    db.store_selection(
        database,
        {
            "_id": selection_id,
            "campaign_id": campaign_id,
            "generation": generation,
            "scored": len(frames),
            "selected": selected,
            "wall_time": time.perf_counter() - started,
        },
        uncertainties,
        predictions,
    )
    return {"scored": len(frames), "selected": len(selected)}


def _select(database, campaign_id: str, spec: CampaignSpec, frames: list[dict], batch_size: int):
    """Frame ids picked by the selection method, every frame's committee uncertainty, and the
    committee's prediction of each frame picked (for its calibration record)."""
    import mace  # noqa: F401  (mace before e3nn)

    from fff_jobs.committee import load_committee, predict_committee
    from fff_jobs.selection import select_frames

    documents, models = load_committee(database, campaign_id)
    atoms = [Frame.model_validate(frame["frame"]).to_atoms() for frame in frames]
    prediction = predict_committee(
        models,
        atoms,
        compute_forces=True,
        descriptors=spec.selection.method == "farthest_point",
        batch_size=spec.inference_batch_size,
    )
    per_atom = prediction.energies / [len(a) for a in atoms]
    uncertainty = prediction.uncertainty(spec.uncertainty)
    settings = spec.selection.model_copy(update={"batch_size": batch_size})
    picked = select_frames(uncertainty, settings, per_atom.T, prediction.descriptors)
    generation = documents[0]["generation"]
    predictions = {
        frames[index]["_id"]: prediction.frame_prediction(int(index), generation).model_dump()
        for index in picked
    }
    uncertainties = {
        frame["_id"]: float(value) for frame, value in zip(frames, uncertainty, strict=True)
    }
    return list(predictions), uncertainties, predictions


@job
def calculate(campaign_id: str, frame_ids: list[str]) -> Response:
    """Compute selected frames with the reference; may start the next training round."""
    database = project_database()
    spec = campaign_spec(db.get_campaign(database, campaign_id))
    computed = 0
    for frame in db.get_frames(database, frame_ids):
        result_id = f"{frame['_id']}-active"
        if db.find_reference_result(database, result_id) or not db.claim_budget(
            database, campaign_id, result_id, this_job()
        ):
            continue
        (result,) = compute_references(
            [Frame.model_validate(frame["frame"]).to_atoms()], spec.reference
        )
        document = result_document(
            result,
            campaign_id,
            result_id,
            "active",
            frame.get("prediction"),
            trajectory_id=frame["trajectory_id"],
            segment=frame["segment"],
            generation=frame["generation"],
            selection_id=frame["selection_id"],
            frame_id=frame["_id"],
        )
        computed += db.store_reference_result(database, document)
    additions = next_training(database, campaign_id, spec)
    maybe_finish(database, campaign_id)
    additions += keep_going(database, campaign_id, spec)
    return _grow(database, campaign_id, spec, {"computed": computed}, additions)
