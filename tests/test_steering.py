"""The steering's rules, decided from snapshots built here: no database, no torch, no jobs.

Each test sets up a campaign document as a job would read it, with the counts the
database would answer, and checks what the steering decides: training rounds, the end
of the budget and the target error, retirement and revival of trajectories, keep-going
once every trajectory retired, and selections once enough frames are pooled.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Mapping

from fff_jobs import steering
from fff_jobs.schemas import (
    AuditDecision,
    Campaign,
    Frame,
    GenerationRecord,
    LastSegment,
    Trajectory,
    now,
)
from fff_jobs.spec import CampaignSpec

SPEC = CampaignSpec(
    name="rules",
    system={"water_clusters": {}},
    retrain_freq=4,
    num_to_run=20,
    inference_chunk=10,
    max_trajectory_failures=3,
    selection={"batch_size": 5},
    target_force_error=0.05,
)
START = Frame(numbers=[8], positions=[[0.0, 0.0, 0.0]], cell=[[0.0] * 3] * 3, pbc=[False] * 3)
MOVED = START.model_copy(update={"positions": [[0.1, 0.0, 0.0]]})


class Counts(Mapping[str, int]):
    """The counts a job's database would answer; it records which the steering asked for."""

    def __init__(self, **values: int) -> None:
        self.values, self.asked = values, set()

    def __getitem__(self, name: str) -> int:
        self.asked.add(name)
        return self.values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


def counts(**values: int) -> Counts:
    """Counts with every name present (zero unless given)."""
    names = (
        steering.SUCCESSFUL,
        steering.BUDGETED,
        steering.POOLED_FRAMES,
        steering.SAMPLING_TRAJECTORIES,
    )
    names += (steering.REVIVABLE, steering.UNCALCULATED)
    return Counts(**(dict.fromkeys(names, 0) | values))


def campaign(spent: int = 0, trained: int = 12, **state) -> Campaign:
    """A running campaign with 12 initial results, generation 0 trained on them."""
    document = {
        "_id": "rules-1",
        "name": "rules",
        "spec": SPEC,
        "budget": {"num_to_run": SPEC.num_to_run, "spent": spent},
        "initial_results": 12,
        "training": {"generation": 0, "trained_results": trained},
        "followed_up_generation": 0,
    }
    return Campaign.model_validate(document | state)


def idle(spent: int = 2, **state) -> Campaign:
    """A campaign one of whose trajectories retired since the last revival."""
    return campaign(spent, idle_trajectories=True, **state)


def trajectory(**state) -> Trajectory:
    last = LastSegment(segment=2, steps=100, generation=0, wall_time=1.0, final_frame=MOVED)
    document = {"_id": "rules-1-t000", "campaign_id": "rules-1", "index": 0}
    document |= {"start_frame": START, "current_frame": START, "run_length": 100}
    document |= {"last_segment": last, "segments_completed": 3, "audits_completed": 2}
    return Trajectory.model_validate(document | state)


def audit(action: str, run_length: int = 50) -> AuditDecision:
    return AuditDecision(
        action=action, reason="test", error_per_atom=0.01, tolerance=0.02, run_length=run_length
    )


def record(generation: int, force_mae: float) -> GenerationRecord:
    return GenerationRecord(
        generation=generation, training_set_size=20, reference_spent=8, healthy_members=2,
        validation_energy_mae_per_atom=0.01, validation_force_mae=force_mae,
        validation_force_rmse=2 * force_mae, validation_frames=5, published_at=now(),
    )  # fmt: skip


# --- training rounds ---


def test_a_round_starts_once_retrain_freq_new_results_arrived():
    assert steering.next_round(campaign(spent=4), counts(successful_results=15)) is None
    assert steering.next_round(campaign(spent=4), counts(successful_results=16)) == 4
    decision = steering.after_calculation(campaign(spent=4), counts(successful_results=16))
    assert decision.claim_round == 4 and decision.finish is None


def test_no_round_while_one_is_training_or_the_campaign_is_complete():
    running = campaign(spent=8, training={"running": True, "generation": 1, "trained_results": 12})
    assert steering.next_round(running, counts(successful_results=20)) is None
    complete = campaign(spent=8, status="complete")
    assert steering.next_round(complete, counts(successful_results=20)) is None


def test_results_are_not_counted_while_too_little_budget_was_spent_for_a_round():
    few = counts(successful_results=20)
    assert steering.next_round(campaign(spent=3), few) is None
    assert few.asked == set()  # 12 initial + 3 spent cannot make 4 new: no query


def test_the_last_round_trains_on_every_result_once_the_budget_is_spent():
    spent = campaign(spent=20, trained=31)
    assert steering.next_round(spent, counts(successful_results=32)) == 1
    assert steering.next_round(spent, counts(successful_results=31)) is None


# --- the end of the budget and the target error ---


def test_the_campaign_ends_once_its_budget_is_spent_stored_and_trained_on():
    spent = campaign(spent=20, trained=32)
    done = counts(successful_results=32, budgeted_results=20)
    assert steering.finish_reason(spent, done) == steering.BUDGET_SPENT
    assert steering.after_audit(spent, trajectory(), 2, done).finish == steering.BUDGET_SPENT
    in_flight = counts(successful_results=31, budgeted_results=19)
    assert steering.finish_reason(spent, in_flight) is None  # a claimed result is computing
    training = campaign(spent=20, training={"running": True, "generation": 4})
    assert steering.finish_reason(training, done) is None
    assert steering.finish_reason(campaign(spent=19), done) is None


def test_a_generation_that_reaches_the_target_force_error_ends_the_campaign():
    decision = steering.after_generation(campaign(spent=8), record(2, 0.04), counts())
    assert decision.finish.startswith("validation force error 0.0400 eV/A reached the target")
    assert decision.claim_round is None and not decision.revive
    live = counts(sampling_or_retired_trajectories=2)
    assert steering.after_generation(campaign(spent=8), record(2, 0.06), live).finish is None


def test_segments_stop_once_the_budget_is_spent_or_the_campaign_is_complete():
    assert steering.segment_may_run(campaign(spent=19))
    assert not steering.segment_may_run(campaign(spent=20))
    assert not steering.segment_may_run(campaign(status="complete"))
    assert steering.selection_size(campaign(spent=17)) == 3  # within the budget left
    assert steering.selection_size(campaign(spent=0)) == 5


# --- trajectories: audits, retirement, revival ---


def test_a_passed_audit_continues_from_the_audited_frame():
    changes = steering.audited_trajectory(trajectory(failures=2), audit("continue", 200), 3)
    assert changes["current_frame"] == MOVED.model_dump() and changes["run_length"] == 200
    assert (changes["failures"], changes["restarts"], changes["status"]) == (0, 0, "sampling")


def test_failed_audits_restart_and_retire_a_trajectory_after_max_failures():
    once = steering.audited_trajectory(trajectory(failures=1), audit("restart", 25), 3)
    assert once["current_frame"] == START.model_dump()
    assert (once["failures"], once["restarts"], once["status"]) == (2, 1, "sampling")
    third = steering.audited_trajectory(trajectory(failures=2), audit("restart"), 3)
    assert (third["failures"], third["status"]) == (3, "retired")


def test_an_audit_adds_the_next_segment_while_its_trajectory_samples():
    audited = trajectory(audits_completed=3)
    decision = steering.after_audit(campaign(spent=5), audited, 2, counts())
    assert decision.jobs == [steering.SegmentJob("rules-1-t000", 3)]
    retired = trajectory(audits_completed=3, status="retired")
    assert (
        steering.after_audit(campaign(spent=5), retired, 2, counts(sampling_trajectories=1)).jobs
        == []
    )
    assert steering.after_audit(campaign(spent=20), audited, 2, counts()).jobs == []
    not_applied = trajectory(audits_completed=2)  # the budget ran out before its audit
    assert steering.after_audit(campaign(spent=5), not_applied, 2, counts()).jobs == []


def test_generation_0_starts_the_trajectories_and_later_ones_revive_the_retired():
    assert steering.after_generation(campaign(), record(0, 0.2), counts()).start_trajectories
    later = steering.after_generation(idle(8), record(1, 0.2), counts())
    assert later.revive and not later.start_trajectories
    spent = steering.after_generation(idle(20, trained=32), record(4, 0.2), counts())
    assert not spent.revive
    none_retired = counts(sampling_trajectories=2)
    assert not steering.after_generation(campaign(spent=8), record(1, 0.2), none_retired).revive
    rerun = steering.after_generation(campaign(spent=8), record(1, 0.2), none_retired, True)
    assert rerun.revive  # the first run may have revived some, and died before adding them


# --- every trajectory retired: keep going ---


def test_keep_going_selects_pooled_frames_once_every_trajectory_retired():
    left = counts(pooled_frames=3)
    assert steering.keep_going(idle(5), left) == "select"
    decision = steering.after_calculation(idle(5), left)
    assert decision.request_selection and decision.claim_round is None


def test_keep_going_trains_on_new_results_then_ends_with_nothing_new_to_learn():
    new = counts(successful_results=14)
    assert steering.keep_going(idle(), new) == "train"
    assert steering.after_calculation(idle(), new).claim_round == 1
    nothing = counts(successful_results=12)
    assert steering.after_calculation(idle(), nothing).finish == steering.ALL_RETIRED


def test_keep_going_waits_for_live_trajectories_pending_work_and_revived_ones():
    results = {"successful_results": 12}
    assert steering.keep_going(idle(), counts(sampling_trajectories=1, **results)) is None
    assert steering.keep_going(idle(), counts(uncalculated_frames=2, **results)) is None
    pending = idle(selection={"pending": True, "count": 1})
    assert steering.keep_going(pending, counts(**results)) is None
    training = idle(training={"running": True, "generation": 1})
    assert steering.keep_going(training, counts(**results)) is None
    revivable = counts(sampling_or_retired_trajectories=2, **results)
    assert steering.keep_going(idle(), revivable, reviving=True) is None
    assert steering.keep_going(idle(), revivable) == "finish"  # none sampling


def test_keep_going_counts_nothing_while_no_trajectory_retired_since_the_last_revival():
    asked = counts(successful_results=12)
    assert steering.keep_going(campaign(spent=2), asked) is None
    assert steering.after_calculation(campaign(spent=2), asked).finish is None
    assert asked.asked == set()


def test_a_new_generation_that_revives_trajectories_does_not_end_the_campaign():
    retired = counts(successful_results=12, sampling_or_retired_trajectories=2)
    decision = steering.after_generation(idle(), record(1, 0.2), retired)
    assert decision.revive and decision.finish is None
    none_left = steering.after_generation(idle(), record(1, 0.2), counts())
    assert none_left.revive and none_left.finish == steering.ALL_RETIRED


def test_an_audit_whose_trajectory_still_samples_never_asks_about_the_others():
    asked = counts()
    steering.after_audit(idle(5), trajectory(audits_completed=3), 2, asked)
    assert asked.asked == {steering.SUCCESSFUL}  # for the next round; nothing for keep-going


# --- selections ---


def test_a_selection_is_queued_once_enough_frames_are_pooled():
    segment = steering.after_segment(campaign(spent=5), "rules-1-t000", 2, counts(pooled_frames=9))
    assert segment.detour == steering.AuditJob("rules-1-t000", 2)
    assert not segment.request_selection
    full = counts(pooled_frames=10)
    assert steering.after_segment(campaign(spent=5), "rules-1-t000", 2, full).request_selection
    pending = campaign(spent=5, selection={"pending": True, "count": 3})
    assert not steering.after_segment(pending, "rules-1-t000", 2, full).request_selection


def test_a_selection_adds_calculations_of_its_frames():
    decision = steering.after_selection(campaign(spent=5), 3, ["f1", "f2"], counts())
    assert decision.jobs == [steering.CalculationJobs(3, ["f1", "f2"])]
    assert not decision.request_selection  # it took every pooled frame
    empty = steering.after_selection(idle(5), 4, [], counts(pooled_frames=2))
    assert empty.jobs == [] and empty.request_selection  # every trajectory retired


def test_the_steering_loads_neither_torch_nor_a_database():
    code = (
        "import sys, fff_jobs.steering, fff_jobs.schemas; "
        "print(sorted({'torch', 'mace', 'pymongo', 'jobflow'} & set(sys.modules)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "[]"


def test_the_first_job_trains_generation_0_on_the_initial_data():
    assert steering.after_ingest(campaign()).claim_round == 1


def test_trajectories_start_on_every_size_at_every_temperature():
    sizes = [9, 9, 12, 12, 15, 15, 18, 18]  # two starting structures of 3, 4, 5 and 6 waters
    plan = steering.trajectory_starts(sizes, 8, [300.0, 450.0, 600.0])
    structures = [structure for structure, _ in plan]
    assert sorted(structures) == list(range(8))  # every structure once
    assert [sizes[s] for s in structures[:4]] == [9, 12, 15, 18]  # sizes first, smallest up
    assert {temperature for _, temperature in plan} == {300.0, 450.0, 600.0}
    for size in (9, 12, 15, 18):  # each size at two different temperatures
        assert len({t for s, t in plan if sizes[s] == size}) == 2
    few = steering.trajectory_starts(sizes, 3, [300.0])
    assert [sizes[s] for s, _ in few] == [9, 12, 15]
