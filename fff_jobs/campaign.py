"""The campaign's stages, each a recipe: read the snapshot, do the science, store once, decide.

Every job of a campaign (:mod:`fff_jobs.jobs`) runs one of these functions. Each
reads its snapshot (the campaign document, and its trajectory for segments and
audits), does the science of its stage, stores what it computed with one atomic
write guarded against a second run, asks :mod:`fff_jobs.steering` what follows, and
applies that decision: conditional claims (a training round, a selection, the
budget) and the jobs to add, returned as plans.

Every claim names the job that took it (its jobflow uuid, the same in every re-run)
and when. A job killed at any point is re-run by ``lpad detect_lostruns --rerun``
(or `fff recover`): the re-run finds what the dead run stored, gets its own claims
back, and proposes again what the dead run would have added; jobs are named
uniquely, and those the LaunchPad holds already are left out (``fresh`` tells a run
that did its stage's work itself, so no earlier run can have added anything). Heavy
science modules (torch, mace) are imported inside the GPU stages only, so that CPU
workers running audits and reference calculations never load them.
"""

from __future__ import annotations

import math
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from ase import Atoms

from fff_jobs import database as db
from fff_jobs import steering
from fff_jobs.calibration import calibration_record
from fff_jobs.reference import compute_references
from fff_jobs.schemas import (
    RETIRED,
    SAMPLING,
    STOPPED,
    Campaign,
    GenerationRecord,
    LastSegment,
    ModelRecord,
    NewCampaign,
    PooledFrame,
    ReferenceResult,
    Selection,
    StoredResult,
    TrainingSnapshot,
    Trajectory,
    trajectory_id_for,
)
from fff_jobs.spec import CampaignSpec
from fff_jobs.steering import JobPlan, SegmentJob, trajectory_starts


@dataclass
class Stage:
    """What a stage's job returns: its output, the jobs it adds, and whether it did the work."""

    campaign: Campaign
    output: dict
    plans: list[JobPlan] = field(default_factory=list)
    fresh: bool = False  # this run stored the stage's work: no earlier run added jobs


def new_campaign(spec: CampaignSpec) -> NewCampaign:
    """A campaign ready to store: a new id, the structures it starts from (files read here)."""
    from fff_jobs.structures import starting_data

    starting, initial = starting_data(spec.system)
    campaign_id = f"{spec.name}-{uuid.uuid4().hex[:6]}"
    return NewCampaign(
        campaign_id=campaign_id, spec=spec, starting_structures=starting, initial_data=initial
    )


def this_job() -> str:
    """The running job's uuid, which owns the claims it takes; a re-run has the same one."""
    from jobflow import CURRENT_JOB

    return CURRENT_JOB.job.uuid if CURRENT_JOB.job is not None else "no-job"


# --- applying a decision ---


def apply(
    database, campaign: Campaign, decision: steering.Decision, counts: db.CampaignCounts
) -> list[JobPlan]:
    """Make a decision's state changes (each one conditional update); the jobs to add.
    ``counts`` are those the decision was taken on (a round's snapshot among them)."""
    plans: list[JobPlan] = list(decision.jobs)
    if decision.finish is not None:
        db.finish_campaign(database, campaign.id, decision.finish)
    if decision.start_trajectories:
        plans += _start_trajectories(database, campaign)
    if decision.revive:
        revived = db.revive_trajectories(database, campaign.id, campaign.followed_up_generation)
        plans += [SegmentJob(t.id, t.segments_completed) for t in revived]
    if decision.claim_round is not None:
        generation = db.claim_training_round(
            database, campaign, decision.claim_round, this_job(), counts
        )
        plans += [] if generation is None else [steering.TrainJobs(generation)]
    if decision.request_selection:
        number = db.request_selection(database, campaign, this_job())
        plans += [] if number is None else [steering.SelectionJob(number)]
    return plans + ([decision.detour] if decision.detour else [])


def _start_trajectories(database, campaign: Campaign) -> list[JobPlan]:
    """Create the trajectories and propose their first segments (again, for a re-run)."""
    spec = campaign.spec
    starts = db.starting_structures(database, campaign.id)
    sizes = [len(start.frame.numbers) for start in starts]
    plan = trajectory_starts(sizes, spec.trajectories, spec.md.temperatures)
    trajectories = [
        Trajectory(
            id=trajectory_id_for(campaign.id, index),
            campaign_id=campaign.id,
            index=index,
            temperature=temperature,
            start_frame=starts[structure].frame,
            current_frame=starts[structure].frame,
            run_length=spec.md.run_length,
        )
        for index, (structure, temperature) in enumerate(plan)
    ]
    db.create_trajectories(database, trajectories)
    return [SegmentJob(trajectory.id, 0) for trajectory in trajectories]


# --- reference results ---


def stored_result(
    result: ReferenceResult, result_id: str, campaign_id: str, source: str, sequence: int, **more
) -> StoredResult:
    """What is stored of one reference calculation: the result, its source and provenance.

    With the committee's ``prediction`` of the frame (in ``more``), a successful result
    also keeps its calibration record: the predicted uncertainty beside the actual error.
    """
    prediction = more.pop("prediction", None)
    if prediction is not None and result.success:
        more["calibration"] = calibration_record(prediction, result.energy, result.forces)
    return StoredResult(
        id=result_id,
        campaign_id=campaign_id,
        source=source,
        sequence=sequence,
        **result.model_dump(),
        **more,
    )


def _claim_and_find(
    database, campaign: Campaign, result_ids: list[str]
) -> tuple[dict[str, int | None], dict[str, StoredResult]]:
    """Budget for each result id (its sequence; None: claimed by an earlier run), and the
    results earlier runs stored already."""
    granted = db.claim_budget(database, campaign, result_ids, this_job())
    held = [result_id for result_id, sequence in granted.items() if sequence is None]
    return granted, db.find_reference_results(database, held) if held else {}


def _sequence(database, campaign_id: str, sequence: int | None) -> int:
    return sequence if sequence is not None else db.reserve_sequence(database, campaign_id, 1)


# --- ingest ---


def ingest(database, campaign_id: str, new: NewCampaign | None = None) -> Stage:
    """Store the campaign if it came with the job, label the initial data, train generation 0."""
    if new is not None:
        db.create_campaign(database, new)
    campaign = db.get_campaign(database, campaign_id)
    frames = _initial_frames(database, campaign)
    ids = [f"{campaign_id}-initial-{index:05d}" for index in range(len(frames))]
    stored = db.find_reference_results(database, ids)
    missing = [(i, atoms) for i, atoms in zip(ids, frames, strict=True) if i not in stored]
    results = compute_references([atoms for _, atoms in missing], campaign.spec.reference)
    if missing:
        first = db.reserve_sequence(database, campaign_id, len(missing))
        new_results = [
            stored_result(result, result_id, campaign_id, "initial", first + index)
            for index, ((result_id, _), result) in enumerate(zip(missing, results, strict=True))
        ]
        db.store_reference_results(database, new_results)
        stored |= {result.id: result for result in new_results}
    succeeded = sum(result.success for result in stored.values())
    if succeeded < 2:
        raise ValueError(
            f"campaign {campaign_id}: only {succeeded} of {len(frames)} initial frames were "
            "computed by the reference; check the reference settings and starting structures"
        )
    counts = db.CampaignCounts(database, campaign_id)
    plans = apply(database, campaign, steering.after_ingest(campaign), counts)
    output = {"initial_frames": len(frames), "succeeded": succeeded}
    return Stage(campaign, output, plans, fresh=len(missing) == len(frames))


def _initial_frames(database, campaign: Campaign) -> list[Atoms]:
    """The frames generation 0 trains on, before labelling: the user's, or for water clusters
    the starting structures, rattled copies and short reference MD of them."""
    from fff_jobs import structures
    from fff_jobs.reference import make_calculator

    spec = campaign.spec
    if spec.system.water_clusters is None:
        return [start.frame.to_atoms() for start in db.initial_data(database, campaign.id)]
    search_space = [
        start.frame.to_atoms() for start in db.starting_structures(database, campaign.id)
    ]
    return structures.initial_frames(
        search_space, spec.system.water_clusters, spec.md, make_calculator(spec.reference)
    )


# --- training ---


def train(database, campaign_id: str, generation: int, member: int) -> Stage:
    """Train one committee member on the round's snapshot and register it; the member that
    completes the generation follows it up."""
    campaign = db.get_campaign(database, campaign_id)
    key = db.model_id(campaign_id, generation, member)
    parent = db.model_id(campaign_id, generation - 1, member)
    known = db.find_members(database, [key, parent])
    document, published, training_set = known.get(key), [], None
    if document is None:
        document, published, training_set = _train_and_register(
            database, campaign, generation, member, known.get(parent)
        )
    elif db.current_generation(database, campaign_id) == generation:
        published = db.committee_documents(database, campaign_id, generation)
    stage = Stage(campaign, {"model_id": document.id, "metrics": document.metrics})
    stage.fresh = training_set is not None
    if published:
        following = db.claim_generation_follow_up(database, campaign_id, published, this_job())
        if following is not None:
            stage.campaign = following
            stage.plans = _follow_up(database, following, published, training_set)
    return stage


@dataclass
class TrainingSet:
    """A generation's training snapshot as labelled Atoms, each frame's result id, and
    whether the generation is trained once the budget is spent (``final``)."""

    frames: list[Atoms]
    result_ids: list[str]
    final: bool

    def member_split(self, spec: CampaignSpec, member: int) -> tuple[list[int], list[int]]:
        """A member's training and validation indices: fixed per result for the whole
        campaign; every frame trains a final generation that holds none out."""
        from fff_jobs.training import fixed_split, split_key

        training = spec.training
        if not training.holds_out(self.final):
            return list(range(len(self.frames))), []
        key = split_key(training.seed, member)
        return fixed_split(self.result_ids, key, training.split, training.validation_fraction)


def _training_set(database, snapshot: TrainingSnapshot) -> TrainingSet:
    results = db.training_results(database, snapshot)
    atoms = [result.to_atoms() for result in results]
    return TrainingSet(atoms, [result.id for result in results], snapshot.final)


def _train_and_register(
    database, campaign: Campaign, generation: int, member: int, parent: ModelRecord | None
):
    """Train a member (again with a new seed while it diverges, up to max_attempts), register
    it; (its document, the committee if it completed the generation, its training set)."""
    from fff_jobs.committee import load_weights, weights_to_bytes
    from fff_jobs.training import member_seed, package_versions, training_set_hash
    from fff_jobs.training import train_member as train_one

    spec = campaign.spec
    training_set = _training_set(database, db.training_snapshot(database, campaign.id, generation))
    frames = training_set.frames
    settings = spec.training.for_generation(training_set.final)
    start = None
    if settings.warm_start and parent is not None:
        start = (parent.hyperparameters, load_weights(database, parent))
    split = training_set.member_split(spec, member)
    for attempt in range(settings.max_attempts):
        seed = member_seed(settings.seed, generation, member, attempt)
        trained = train_one(frames, spec.model, settings, seed, start, split)
        diverged = _divergence(trained.history)
        if diverged is None:
            break
    record = ModelRecord(
        id=db.model_id(campaign.id, generation, member),
        campaign_id=campaign.id,
        generation=generation,
        member=member,
        committee_size=spec.training.committee_size,
        hyperparameters=trained.hyperparameters,
        seed=seed,
        attempts=attempt + 1,
        training_set_hash=training_set_hash(frames),
        training_set_size=len(frames),
        validation_set_size=len(split[1]),
        parent_model=parent.id if start else None,
        metrics=trained.metrics,
        loss=settings.loss,
        epochs=trained.epochs,
        best_epoch=trained.best_epoch,
        wall_time=trained.wall_time,
        device=trained.device,
        versions=package_versions(),
        diverged=diverged,
    )
    document, _ = db.register_member(database, record, weights_to_bytes(trained.model.state_dict()))
    published = db.publish_generation(database, campaign.id, generation)
    return document, published, training_set


def _divergence(history: list[dict]) -> str | None:
    """Why a member's training diverged (no finite loss to judge an epoch by), or None.

    A member that still diverges after its last attempt is registered all the same,
    with the weights it started from (its parent's, or fresh ones) and this reason, so
    that its round completes and the campaign goes on; it takes no part in sampling,
    selection or the generation's errors, and `fff status` shows it as a problem.
    """
    from fff_jobs.training import epoch_loss

    if any(math.isfinite(epoch_loss(entry)) for entry in history):
        return None
    judged_by = "validation" if "validation_loss" in history[-1] else "monitor"
    return f"training diverged: {judged_by} loss {epoch_loss(history[-1])} in every epoch"


def _follow_up(
    database,
    campaign: Campaign,
    members: Sequence[ModelRecord],
    training_set: TrainingSet | None,
) -> list[JobPlan]:
    """What the end of a training round adds: it records the generation's errors, then first
    segments, the next round, or the end. ``training_set``: the generation's, if this run
    trained a member (else a re-run, which reads it and revives as before)."""
    generation = members[0].generation
    errors = _generation_errors(database, campaign, generation, members, training_set)
    record = GenerationRecord(
        generation=generation,
        training_set_size=members[0].training_set_size or 0,
        reference_spent=campaign.budget.spent,
        healthy_members=sum(not member.diverged for member in members),
        published_at=db.now(),
        **errors,
    )
    db.record_generation(database, campaign.id, record)
    campaign.generations.append(record)
    counts = db.CampaignCounts(database, campaign.id)
    decision = steering.after_generation(campaign, record, counts, repeated=training_set is None)
    return apply(database, campaign, decision, counts)


def _generation_errors(
    database,
    campaign: Campaign,
    generation: int,
    members: Sequence[ModelRecord],
    training_set: TrainingSet | None,
) -> dict[str, float]:
    """The committee's out-of-sample errors: each frame predicted by the members that never
    trained on it (their mean), over the generation's training snapshot (NaN, over 0
    frames, for a final generation that held none out)."""
    import mace  # noqa: F401  (mace before e3nn)

    from fff_jobs.committee import load_committee, out_of_sample_errors

    spec = campaign.spec
    documents, models = load_committee(database, campaign.id, generation, documents=members)
    training_set = training_set or _training_set(
        database, db.training_snapshot(database, campaign.id, generation)
    )
    held_out = [set(training_set.member_split(spec, d.member)[1]) for d in documents]
    return out_of_sample_errors(models, training_set.frames, held_out, spec.inference_batch_size)


# --- sampling ---


def sample(database, campaign_id: str, trajectory_id: str, segment: int) -> Stage:
    """Run one MD segment with the newest committee, pool its frames; its audit comes next."""
    campaign = db.get_campaign(database, campaign_id)
    trajectory = db.get_trajectory(database, trajectory_id)
    stage = Stage(campaign, {"repeated": True})
    if trajectory.segments_completed <= segment:
        if not steering.segment_may_run(campaign):
            db.set_trajectory_status(database, trajectory_id, STOPPED)
            db.mark_idle_trajectories(database, campaign)
            return Stage(campaign, {"stopped": campaign.stop_reason or steering.BUDGET_SPENT})
        stage.output = _run_segment(database, campaign, trajectory, segment)
        stage.fresh = not stage.output["repeated"]
    counts = db.CampaignCounts(database, campaign_id)
    decision = steering.after_segment(campaign, trajectory_id, segment, counts)
    stage.plans = apply(database, campaign, decision, counts)
    return stage


def _sampling_committee(database, campaign: Campaign):
    """The newest committee's healthy members, the first as an ASE calculator, and its
    generation."""
    import mace  # noqa: F401  (mace before e3nn)
    from mace.calculators import MACECalculator

    from fff_jobs.committee import load_committee
    from fff_jobs.training import resolve_device

    generation = campaign.followed_up_generation
    device = resolve_device(campaign.spec.md.device)
    documents, models = load_committee(
        database, campaign.id, device=device, documents=campaign.committee
    )
    dtype = documents[0].hyperparameters["dtype"]
    calculator = MACECalculator(models=[models[0]], device=device, default_dtype=dtype)
    return calculator, models, generation


def _segment_seed(trajectory_id: str, segment: int) -> int:
    return zlib.crc32(f"{trajectory_id}/{segment}".encode())


def _pooled_frames(trajectory: Trajectory, segment: int, generation: int, result) -> list:
    """The frames a segment keeps, as pooled frames named after the segment."""
    prefix = f"{trajectory.id}-s{segment:04d}"
    return [
        PooledFrame(
            id=f"{prefix}-f{index:03d}",
            campaign_id=trajectory.campaign_id,
            trajectory_id=trajectory.id,
            segment=segment,
            generation=generation,
            frame=frame,
            sampling_energy=energy,
        )
        for index, (frame, energy) in enumerate(zip(result.frames, result.energies, strict=True))
    ]


def _run_segment(database, campaign: Campaign, trajectory: Trajectory, segment: int) -> dict:
    """Run the segment, pool its frames and record it; the job's output."""
    from fff_jobs.committee import committee_uncertainty, predict_committee
    from fff_jobs.sampling import run_segment

    spec = campaign.spec
    calculator, models, generation = _sampling_committee(database, campaign)
    result = run_segment(
        trajectory.current_frame.to_atoms(),
        calculator,
        spec.md,
        num_steps=trajectory.run_length,
        seed=_segment_seed(trajectory.id, segment),
        temperature=trajectory.temperature,
        uncertainty=committee_uncertainty(models, spec.uncertainty, driven_by_first=True),
    )
    prediction = None
    if result.final_energy is not None:
        final = predict_committee(models, [result.final_frame.to_atoms()], compute_forces=True)
        prediction = final.frame_prediction(0, generation)
    db.pool_frames(database, _pooled_frames(trajectory, segment, generation, result))
    last = LastSegment(
        segment=segment,
        steps=result.steps,
        flag=result.flag,
        detail=result.detail,
        generation=generation,
        temperature=trajectory.temperature,
        final_energy=result.final_energy,
        wall_time=result.wall_time,
        final_frame=result.final_frame,
        prediction=prediction,
    )
    completed = db.complete_segment(database, trajectory.id, segment, last)
    output = {"steps": result.steps, "frames": len(result.frames), "flag": result.flag}
    return output | {"generation": generation, "repeated": not completed}


# --- audits ---


def audit(database, campaign_id: str, trajectory_id: str, segment: int) -> Stage:
    """Compute a segment's final frame with the reference; continue or restart the trajectory."""
    campaign = db.get_campaign(database, campaign_id)
    trajectory = db.get_trajectory(database, trajectory_id)
    stage = Stage(campaign, {"repeated": True})
    if trajectory.audits_completed <= segment:
        stage.output, stage.fresh = _audit(database, campaign, trajectory, segment)
    if trajectory.status != SAMPLING:
        db.mark_idle_trajectories(database, campaign)
    counts = db.CampaignCounts(database, campaign_id)
    decision = steering.after_audit(campaign, trajectory, segment, counts)
    stage.plans = apply(database, campaign, decision, counts)
    return stage


def _audit(database, campaign: Campaign, trajectory: Trajectory, segment: int) -> tuple[dict, bool]:
    """Audit the segment and apply the decision to ``trajectory`` (stored, and here); the job's
    output, and whether this run did it all."""
    result_id = f"{trajectory.id}-s{segment:04d}-audit"
    granted, stored = _claim_and_find(database, campaign, [result_id])
    if result_id not in granted:
        db.set_trajectory_status(database, trajectory.id, STOPPED)
        trajectory.status = STOPPED
        return {"stopped": steering.BUDGET_SPENT}, False
    result = stored.get(result_id) or _audit_result(
        database, campaign, trajectory, result_id, granted[result_id]
    )
    assert result.audit is not None
    changes = steering.audited_trajectory(
        trajectory, result.audit, campaign.spec.max_trajectory_failures
    )
    completed = db.complete_audit(database, trajectory.id, segment, changes)
    trajectory.audits_completed = segment + 1
    # not completed: an earlier run did it, or the trajectory stopped meanwhile (read it back)
    trajectory.status = (
        changes["status"] if completed else db.get_trajectory(database, trajectory.id).status
    )
    output = {"decision": result.audit.model_dump(), "retired": changes["status"] == RETIRED}
    fresh = completed and granted[result_id] is not None
    return output | {"repeated": not completed}, fresh


def _audit_result(
    database, campaign: Campaign, trajectory: Trajectory, result_id: str, sequence: int | None
) -> StoredResult:
    """Compute the final frame, decide continue or restart, store both in one result."""
    from fff_jobs.sampling import audit_decision, audit_tolerance

    spec, last = campaign.spec, trajectory.last_segment
    assert last is not None
    (result,) = compute_references([last.final_frame.to_atoms()], spec.reference)
    errors = {g.generation: g.validation_energy_mae_per_atom for g in campaign.generations}
    decision = audit_decision(
        last.prediction.energy if last.prediction else last.final_energy,
        result.energy if result.success else None,
        len(last.final_frame.numbers),
        last.flag,
        trajectory.run_length,
        audit_tolerance(spec.audit, errors.get(last.generation)),
        spec.audit,
    )
    document = stored_result(
        result,
        result_id,
        campaign.id,
        "audit",
        _sequence(database, campaign.id, sequence),
        prediction=last.prediction,
        trajectory_id=trajectory.id,
        segment=last.segment,
        generation=last.generation,
        audit=decision,
    )
    db.store_reference_results(database, [document])
    return document


# --- inference and selection ---


def select(database, campaign_id: str, number: int) -> Stage:
    """Score the pooled frames with the committee and pick the next batch to calculate."""
    campaign = db.get_campaign(database, campaign_id)
    selection_id = db.selection_id(campaign_id, number)
    selection = db.get_selection(database, selection_id)
    stage = Stage(campaign, {"repeated": True}, fresh=selection is None)
    if selection is None:
        selection = _infer_and_select(database, campaign, selection_id)
        stage.output = {"scored": selection.scored, "selected": len(selection.selected)}
    if db.release_selection(database, campaign_id, number):
        campaign.selection.pending = False
    counts = db.CampaignCounts(database, campaign_id)
    decision = steering.after_selection(campaign, number, selection.selected, counts)
    stage.plans = apply(database, campaign, decision, counts)
    return stage


def _infer_and_select(database, campaign: Campaign, selection_id: str) -> Selection:
    """Claim the pooled frames, score them, store the selection."""
    started = time.perf_counter()
    frames = db.claim_pooled_frames(database, campaign.id, selection_id)
    batch_size = steering.selection_size(campaign)
    generation, selected, uncertainties, predictions = None, [], {}, {}
    if frames and batch_size > 0:
        generation, uncertainties, predictions = _score(database, campaign, frames, batch_size)
        selected = list(predictions)
    selection = Selection(
        id=selection_id,
        campaign_id=campaign.id,
        generation=generation,
        scored=len(frames),
        selected=selected,
        wall_time=time.perf_counter() - started,
    )
    db.store_selection(database, selection, uncertainties, predictions)
    return selection


def _score(database, campaign: Campaign, frames: list[PooledFrame], batch_size: int):
    """The committee's generation, every frame's uncertainty, and its prediction of each frame
    picked by the selection method (kept for the calibration record)."""
    import mace  # noqa: F401  (mace before e3nn)

    from fff_jobs.committee import load_committee, predict_committee
    from fff_jobs.selection import select_frames

    spec = campaign.spec
    documents, models = load_committee(database, campaign.id, documents=campaign.committee)
    atoms = [frame.frame.to_atoms() for frame in frames]
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
    score = prediction.total_force_deviation if settings.score == "total_force" else uncertainty
    segments = [f"{frame.trajectory_id}/{frame.segment}" for frame in frames]
    picked = select_frames(score, settings, per_atom.T, prediction.descriptors, segments)
    generation = documents[0].generation
    predictions = {
        frames[index].id: prediction.frame_prediction(int(index), generation).model_dump()
        for index in picked
    }
    uncertainties = {
        frame.id: float(value) for frame, value in zip(frames, uncertainty, strict=True)
    }
    return generation, uncertainties, predictions


# --- reference calculations of selected frames ---


def calculate(database, campaign_id: str, frame_ids: list[str]) -> Stage:
    """Compute selected frames with the reference; may start the next training round."""
    campaign = db.get_campaign(database, campaign_id)
    frames = {f"{frame.id}-active": frame for frame in db.get_frames(database, frame_ids)}
    granted, stored = _claim_and_find(database, campaign, list(frames))
    computed = 0
    for result_id, sequence in granted.items():
        if result_id in stored:
            continue
        frame = frames[result_id]
        (result,) = compute_references([frame.frame.to_atoms()], campaign.spec.reference)
        document = stored_result(
            result,
            result_id,
            campaign_id,
            "active",
            _sequence(database, campaign_id, sequence),
            prediction=frame.prediction,
            trajectory_id=frame.trajectory_id,
            segment=frame.segment,
            generation=frame.generation,
            selection_id=frame.selection_id,
            frame_id=frame.id,
        )
        computed += db.store_reference_results(database, [document])
    counts = db.CampaignCounts(database, campaign_id)
    plans = apply(database, campaign, steering.after_calculation(campaign, counts), counts)
    fresh = None not in granted.values()
    return Stage(campaign, {"computed": computed}, plans, fresh)
