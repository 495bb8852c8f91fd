"""Settings of a campaign, as pydantic models: every default lives here and nowhere else.

Each stage of the loop has its own section; a later change composes them into the
campaign spec that users write in `workflows/*.yaml`. Unknown keys are rejected.
Validation is pure (no file is opened, no module imported), so a job reads a stored
spec back anywhere; what the machine must provide (structure files, the reference
code) is checked once, at submit, by :meth:`CampaignSpec.check_resources`.
"""

from __future__ import annotations

import importlib
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def _takes_numbers(annotation: object) -> bool:
    """Whether a field of this type holds numbers (int or float), possibly in a list or mapping."""
    if annotation in (int, float):
        return True
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return bool not in arguments and any(_takes_numbers(a) for a in arguments)
    if origin in (list, tuple, set):
        return any(_takes_numbers(a) for a in arguments)
    if origin is dict:
        return _takes_numbers(arguments[-1])
    return False


def _booleans(value: object) -> list[bool]:
    """The booleans in a value, in a list or mapping too."""
    if isinstance(value, bool):
        return [value]
    if isinstance(value, list | tuple | set):
        return [item for element in value for item in _booleans(element)]
    if isinstance(value, dict):
        return _booleans(list(value.values()))
    return []


def _check_device(value: str) -> str:
    if not DEVICE_PATTERN.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a torch device fff can use: give cpu, cuda, cuda:N (a GPU's "
            "index) or auto (cuda when present)"
        )
    return value


# A torch device: every setting that places a model on a device uses this type.
Device = Annotated[str, AfterValidator(_check_device)]


class Section(BaseModel):
    """Base of every settings section: unknown keys are an error, values are validated.

    Numbers are checked alike in every section: a boolean is never a number (YAML's
    ``true`` would otherwise count as 1), and neither is infinity or NaN.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: object, info: ValidationInfo) -> object:
        field = cls.model_fields.get(info.field_name or "")
        booleans = _booleans(value)
        if booleans and field is not None and _takes_numbers(field.annotation):
            word = str(booleans[0]).lower()
            raise ValueError(f"a number is required, not the boolean {word}")
        return value


# --- model and training (MACE committee) ---


class ModelSettings(Section):
    """Architecture of every committee member (a MACE ``ScaleShiftMACE``).

    The defaults are a small model (about 33k parameters for H, O; 16x0e) that trains in
    seconds on a CPU. For production on a GPU use :meth:`gpu_defaults`, MACE's
    published "medium" model: 128 channels with max_L 1, r_max 5 A, correlation 3.
    """

    r_max: float = Field(5.0, gt=0, description="cutoff radius, Angstrom")
    num_channels: int = Field(16, ge=1, description="channels of the hidden features")
    max_L: int = Field(0, ge=0, le=3, description="highest symmetry of hidden features")  # noqa: N815
    num_interactions: int = Field(2, ge=1, description="message-passing layers")
    correlation: int = Field(3, ge=1, description="correlation order of the products")
    max_ell: int = Field(3, ge=0, description="highest l of the edge spherical harmonics")
    num_radial_basis: int = Field(8, ge=1)
    num_cutoff_basis: int = Field(5, ge=1)
    radial_mlp: list[int] = Field(default_factory=lambda: [64, 64, 64])
    mlp_irreps: str = Field("16x0e", description="hidden irreps of the last readout")
    dtype: Literal["float32", "float64"] = "float64"
    atomic_energies: dict[str, float] | None = Field(
        None, description="E0s by element symbol, eV; None: least squares fit on the training set"
    )

    @classmethod
    def gpu_defaults(cls, **changes: object) -> ModelSettings:
        """MACE's "medium" model for production on a GPU (about 655k parameters for H, O)."""
        values = {"num_channels": 128, "max_L": 1, "r_max": 5.0, "correlation": 3}
        return cls(**(values | changes))


class TrainingSettings(Section):
    """How each committee member is trained (the original: Huber loss 0.1 energy, 0.9 force)."""

    committee_size: int = Field(8, ge=1, description="members per generation")
    split: Literal["bootstrap", "random"] = Field(
        "bootstrap",
        description="bootstrap: train on a resample, validate on frames left out; "
        "random: a random split with validation_fraction held out",
    )
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    loss: Literal["huber", "mse"] = "huber"
    energy_weight: float = Field(0.1, ge=0, description="weight of the energy per atom loss")
    forces_weight: float = Field(0.9, ge=0)
    huber_delta: float = Field(0.01, gt=0)
    batch_size: int = Field(10, ge=1)
    validation_batch_size: int = Field(50, ge=1)
    learning_rate: float = Field(0.01, gt=0)
    weight_decay: float = Field(5e-7, ge=0)
    max_epochs: int = Field(500, ge=1)
    final_max_epochs: int | None = Field(
        None,
        ge=1,
        description="a generation trained once the whole budget is spent (the committee the "
        "campaign delivers; earlier ones only steer sampling) trains from scratch for this "
        "many epochs, without stopping early, and keeps its best epoch; null: like every "
        "other generation",
    )
    final_loss: Literal["huber", "mse"] | None = Field(
        None,
        description="the loss of the generation trained once the budget is spent; null: "
        "`loss`. Huber is nearly an absolute error past its delta, which steadies short runs "
        "from a poor start; the squared error weighs the largest errors more, which pays in "
        "a long run on clean labels",
    )
    final_holdout: bool = Field(
        True,
        description="whether the generation trained once the budget is spent holds out "
        "validation frames like the others; false: each of its members trains on every "
        "result and judges its epochs on every tenth of them (needs final_max_epochs). The "
        "generation then reports no out-of-sample errors: score it on a hold-out set "
        "(`fff report --holdout`)",
    )
    patience: int = Field(30, ge=1, description="epochs without a better validation loss")
    scheduler_patience: int = Field(10, ge=1, description="epochs before the rate is reduced")
    learning_rate_factor: float = Field(0.8, gt=0, lt=1)
    max_grad_norm: float | None = 10.0
    ema_decay: float | None = Field(
        0.99,
        gt=0,
        lt=1,
        description="keep an exponential moving average of the weights (mace's --ema) and "
        "validate and keep the average; null: the raw weights",
    )
    warm_start: bool = Field(True, description="start member i from member i of the last one")
    warm_start_learning_rate_factor: float = Field(
        0.3,
        gt=0,
        le=1,
        description="a warm-started member's learning rate as a share of learning_rate: the "
        "full rate throws it out of its parent's minimum",
    )
    seed: int = Field(0, description="committee seed; each member derives its own from it")
    max_attempts: int = Field(
        3, ge=1, description="a member whose training diverges is trained again, with a new seed"
    )
    device: Device = Field("auto", description="auto: cuda if present")

    @model_validator(mode="after")
    def _final_without_holdout_needs_its_epochs(self) -> TrainingSettings:
        if not self.final_holdout and self.final_max_epochs is None:
            raise ValueError(
                "final_holdout: false needs final_max_epochs: with no validation frame "
                "nothing stops the delivered generation early; set final_max_epochs "
                "(e.g. 100), or final_holdout: true"
            )
        return self

    def holds_out(self, final: bool) -> bool:
        """Whether a generation's members hold out validation frames (``final``: the
        generation trained once the budget is spent)."""
        return self.final_holdout or not final

    def for_generation(self, final: bool) -> TrainingSettings:
        """The settings a generation trains with: a final one from scratch, for longer, with
        its own loss.

        A cold start trained for longer ends lower than a chain of warm starts: on the
        README's hold-out set, 80 epochs from scratch reached a force MAE of 0.038 eV/A,
        40 more epochs from the last warm-started member 0.050 (water_xtb, 120 frames).
        It runs all its epochs: on 18 validation frames the loss stalls for 20 epochs and
        then falls again, and a member stopped at epoch 83 (best 63) scored 0.050 eV/A
        where the same member run to epoch 100 scored 0.044.
        """
        if not final:
            return self
        update: dict[str, object] = {}
        if self.final_max_epochs is not None:
            update = {
                "max_epochs": self.final_max_epochs,
                "patience": self.final_max_epochs,
                "warm_start": False,
            }
        if self.final_loss is not None:
            update["loss"] = self.final_loss
        return self.model_copy(update=update)


# --- reference calculations, structures, MD sampling, audits, selection ---
XTB_METHODS = ("GFN2-xTB", "GFN1-xTB", "IPEA1-xTB")


def import_object(path: str) -> Any:
    """Import ``package.module.Name``; raise ValueError saying what is wrong and what to do."""
    module_name, _, attribute = path.rpartition(".")
    if not module_name:
        raise ValueError(f"import path {path!r} must look like 'package.module.ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"import path {path!r}: module {module_name!r} cannot be imported ({error}); "
            "install it or correct the path"
        ) from error
    if not hasattr(module, attribute):
        raise ValueError(f"import path {path!r}: module {module_name!r} has no {attribute!r}")
    return getattr(module, attribute)


class CalculatorSpec(Section):
    """Any ASE calculator, as an import path plus keyword arguments (VASP, CP2K, ORCA, a model)."""

    import_path: str
    kwargs: dict[str, Any] = Field(default_factory=dict)

    def check_importable(self) -> None:
        """Raise ValueError unless the import path names a calculator class here."""
        if not callable(import_object(self.import_path)):
            raise ValueError(f"import path {self.import_path!r} does not name a calculator class")


class ReferenceSettings(Section):
    """Which reference code labels frames, with which charge and spin, within which limits."""

    code: Literal["xtb", "pyscf", "ase"] = "xtb"
    method: str | None = None  # xtb: GFN2-xTB; pyscf: HF or a functional (PBE); ase: unused
    basis: str = "def2-svp"  # pyscf only
    calculator: CalculatorSpec | None = None  # code "ase" only
    charge: int = 0
    multiplicity: int = Field(1, ge=1)  # 2S+1; unpaired electrons = multiplicity - 1
    time_limit: float | None = Field(None, gt=0)  # seconds per calculation; None: no limit
    max_force: float = Field(50.0, gt=0)  # eV/A; larger forces mark a failed calculation
    max_scf_cycles: int = Field(200, gt=0)  # pyscf only

    @model_validator(mode="before")
    @classmethod
    def _default_method(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("method") is None:
            defaults = {"xtb": "GFN2-xTB", "pyscf": "PBE"}
            data = {**data, "method": defaults.get(data.get("code", "xtb"))}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ReferenceSettings:
        if self.code == "xtb" and self.method not in XTB_METHODS:
            raise ValueError(f"xtb method {self.method!r} is not one of {XTB_METHODS}")
        if (self.code == "ase") != (self.calculator is not None):
            raise ValueError("give `calculator` (an import path) exactly when code is 'ase'")
        if self.code == "ase" and (self.charge, self.multiplicity) != (0, 1):
            raise ValueError(
                "code 'ase': set charge and spin in calculator.kwargs, with the code's own keywords"
            )
        return self

    def check_code(self) -> None:
        """Raise ValueError, naming the setting, unless the reference code can run here."""
        if self.code == "pyscf":
            _check_pyscf(self.method or "", self.basis)
        if self.calculator is not None:
            try:
                self.calculator.check_importable()
            except ValueError as error:
                raise ValueError(f"calculator.import_path: {error}") from None


def _check_pyscf(method: str, basis: str) -> None:
    """Raise ValueError unless pyscf knows the method (HF or a functional) and the basis."""
    import warnings

    try:
        from pyscf import gto
        from pyscf.dft import libxc
    except ImportError as error:
        raise ValueError("code 'pyscf' needs pyscf: pip install 'fff-jobs[pyscf]'") from error
    if method.upper() != "HF":
        try:
            libxc.parse_xc(method)
        except KeyError as error:
            raise ValueError(
                f"pyscf method {method!r}: give HF or a functional pyscf knows (e.g. PBE)"
            ) from error
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gto.basis.load(basis, "H")
    except Exception as error:
        raise ValueError(f"pyscf basis {basis!r} is unknown to pyscf (e.g. def2-svp)") from error


class StructureSettings(Section):
    """Checks on structures read from users' files or built as starting points."""

    min_distance: float = Field(0.5, gt=0)  # A; closer atoms overlap
    elements: list[str] | None = None  # allowed element symbols; None: any known element


class WaterClusterSettings(Section):
    """Starting structures and the initial training set of the water-cluster example."""

    min_waters: int = Field(3, ge=1)
    max_waters: int = Field(8, ge=1)
    structures_per_size: int = Field(4, gt=0)
    oxygen_spacing: float = Field(2.8, gt=2.0)  # A between neighbouring oxygens
    jitter: float = Field(0.15, ge=0)  # A, uniform noise on oxygen positions
    min_intermolecular_distance: float = Field(1.5, gt=0)  # A between atoms of two waters
    rattled_per_structure: int = Field(4, ge=0)
    rattle_stdev: float = Field(0.05, ge=0)  # A
    md_frames_per_structure: int = Field(4, ge=0)  # frames of a short reference MD
    md_steps: int = Field(40, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _range(self) -> WaterClusterSettings:
        if self.min_waters > self.max_waters:
            raise ValueError(f"min_waters {self.min_waters} > max_waters {self.max_waters}")
        return self


class MDSettings(Section):
    """A segment of molecular dynamics: integrator, length, frames kept and the guards."""

    # K, Maxwell-Boltzmann velocities (and Langevin); a list is a ladder: trajectory i runs
    # at the i-th temperature, round robin, so the campaign samples every one of them
    temperature: float | list[float] = 300.0
    timestep: float = Field(0.5, gt=0, le=5)  # fs
    run_length: int = Field(100, gt=0)  # steps of a trajectory's first segment
    num_frames: int = Field(10, gt=0)  # frames kept per segment, evenly spaced
    thermostat: Literal["none", "langevin"] = "none"  # none: velocity Verlet (NVE)
    friction: float = Field(0.01, gt=0)  # 1/fs, Langevin only
    min_distance: float = Field(0.5, gt=0)  # A; closer atoms end the segment
    max_force: float = Field(20.0, gt=0)  # eV/A; a larger force ends the segment
    fragment_distance: float = Field(5.0, gt=0)  # A; pieces farther apart: flying apart
    guard_interval: int = Field(1, gt=0)  # steps between guard checks
    # a segment stops at the first checked frame whose committee uncertainty (the campaign's
    # `uncertainty`: eV/A for force, eV/atom for energy) passes this; null: never
    uncertainty_threshold: float | None = Field(0.25, gt=0)
    uncertainty_interval: int = Field(10, gt=0)  # steps between committee checks
    device: Device = "auto"  # torch device of a MACE model; auto: cuda when available
    dtype: Literal["float32", "float64"] = "float64"

    @property
    def temperatures(self) -> list[float]:
        """The temperature ladder (K): one temperature, or the list given."""
        return self.temperature if isinstance(self.temperature, list) else [self.temperature]

    @model_validator(mode="after")
    def _distances(self) -> MDSettings:
        if self.min_distance >= self.fragment_distance:
            raise ValueError(
                f"min_distance {self.min_distance} must be below "
                f"fragment_distance {self.fragment_distance}"
            )
        if not self.temperatures or min(self.temperatures) <= 0:
            raise ValueError("temperature: give one temperature or a list, each above 0 K")
        return self


class AuditSettings(Section):
    """When an audited segment may continue, and how long the next segment runs."""

    # the tolerance on |E_ML - E_ref| per atom is tolerance_factor x the committee's
    # out-of-sample energy error, within [energy_tolerance, max_energy_tolerance] (eV/atom);
    # tolerance_factor null: energy_tolerance, fixed
    energy_tolerance: float = Field(0.002, gt=0)
    max_energy_tolerance: float = Field(0.02, gt=0)
    tolerance_factor: float | None = Field(3.0, gt=0)
    min_run_length: int = Field(10, gt=0)  # steps
    max_run_length: int = Field(1000, gt=0)  # steps
    growth: float = Field(2.0, gt=1)  # a passed audit multiplies the run length, a failed divides

    @model_validator(mode="after")
    def _range(self) -> AuditSettings:
        if self.min_run_length > self.max_run_length:
            raise ValueError(
                f"min_run_length {self.min_run_length} > max_run_length {self.max_run_length}"
            )
        if self.energy_tolerance > self.max_energy_tolerance:
            raise ValueError(
                f"energy_tolerance {self.energy_tolerance} > "
                f"max_energy_tolerance {self.max_energy_tolerance}"
            )
        return self


class SelectionSettings(Section):
    """How a batch of frames is picked from the committee's predictions.

    spread: the highest-scoring frame, dropping the frames whose committee predictions
    correlate most with it, repeated (the original); farthest_point: score times the
    distance to the nearest frame picked, in the committee's descriptor space.

    score: total_force, the sum over a frame's atoms of the committee's per-atom force
    deviation (all its disagreement, which grows with the atoms whose forces one
    calculation labels); uncertainty, the campaign's `uncertainty` (the largest per-atom
    force deviation, or the energy spread), as in the original.

    spread_over_segments (spread only): no MD segment in the pool gives more than an even
    share of the batch while another has frames left, so the most doubtful segment's
    neighbouring, correlated frames cannot fill it.
    """

    batch_size: int = Field(16, gt=0)
    method: Literal["spread", "farthest_point"] = "spread"
    score: Literal["total_force", "uncertainty"] = "total_force"
    spread_over_segments: bool = False
    seed: int = 0  # breaks ties between equally ranked frames

    @model_validator(mode="after")
    def _segments_with_spread(self) -> SelectionSettings:
        if self.spread_over_segments and self.method != "spread":
            raise ValueError(
                "selection.spread_over_segments works with method: spread only; "
                "set method: spread or drop spread_over_segments"
            )
        return self


# --- the campaign spec (workflows/*.yaml) ---


class SystemSettings(Section):
    """Where the campaign starts: generated water clusters, or the user's own structure files."""

    water_clusters: WaterClusterSettings | None = None
    starting_structures: Path | None = None  # extxyz or ASE db: MD starts (and restarts) here
    initial_data: Path | None = None  # frames the reference labels for generation 0
    structures: StructureSettings = Field(default_factory=StructureSettings)

    @model_validator(mode="after")
    def _one_source(self) -> SystemSettings:
        files = (self.starting_structures, self.initial_data)
        if (self.water_clusters is None) == (files == (None, None)):
            raise ValueError(
                "give either water_clusters, or starting_structures and initial_data (files)"
            )
        if self.water_clusters is None and None in files:
            raise ValueError("starting_structures and initial_data go together: give both files")
        return self

    def check_files(self) -> None:
        """Raise ValueError unless the structure files exist."""
        for path in (self.starting_structures, self.initial_data):
            if path is not None and not path.is_file():
                raise ValueError(f"{path}: no such file")


class WorkerSettings(Section):
    """Worker categories (fworker `category`) and FireWorks priorities of the campaign's jobs."""

    gpu_category: str = "gpu"  # training, MD segments, inference and selection
    cpu_category: str = "cpu"  # ingest, audits, reference calculations
    ingest_priority: int = 100
    training_priority: int = 30
    inference_priority: int = 20
    sampling_priority: int = 10
    audit_priority: int = 20  # audits go before active-learning calculations
    calculation_priority: int = 10
    # FireWorks rewrites a workflow's whole document for every job that completes or adds
    # jobs, so its cost per job grows with the workflow: past this many jobs, what a job adds
    # goes into a new workflow of the same name (`lpad get_wflows -n "fff campaign ID"`)
    max_workflow_jobs: int = Field(200, ge=10)


class CampaignSpec(Section):
    """A whole campaign: system, reference, committee, sampling, selection, budget, workers."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.]+$", max_length=40)
    system: SystemSettings
    reference: ReferenceSettings = Field(default_factory=ReferenceSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    md: MDSettings = Field(default_factory=MDSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    selection: SelectionSettings = Field(default_factory=SelectionSettings)
    # the committee's uncertainty, for stopping segments, calibration and `selection.score:
    # uncertainty`: force, the largest per-atom force deviation (eV/A); energy, the spread
    # of the energy per atom (eV/atom)
    uncertainty: Literal["force", "energy"] = "force"
    trajectories: int = Field(4, gt=0)  # trajectories kept running
    max_trajectory_failures: int = Field(5, gt=0)  # failed audits in a row retire a trajectory
    inference_chunk: int = Field(50, gt=0)  # pooled frames that start an inference-and-selection
    # frames per batch through the committee; default: 8 on a CPU, 64 on a GPU
    inference_batch_size: int | None = Field(None, gt=0)
    calculations_per_job: int = Field(1, gt=0)  # selected frames per reference-calculation job
    retrain_freq: int = Field(16, gt=0)  # new reference results that start a new generation
    num_to_run: int = Field(100, gt=0)  # reference budget: audits plus selected frames
    target_force_error: float | None = Field(None, gt=0)  # eV/A, validation; stops early
    workers: WorkerSettings = Field(default_factory=WorkerSettings)

    def check_resources(self) -> None:
        """At submit: raise ValueError, naming the setting, unless the structure files exist
        and the reference code can run on this machine."""
        for section, check in (
            ("system", self.system.check_files),
            ("reference", self.reference.check_code),
        ):
            try:
                check()
            except ValueError as error:
                raise ValueError(f"{section}: {error}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> CampaignSpec:
        """Read and check a spec file for submission (its files, its reference code); file paths
        in it are relative to the file."""
        import yaml
        from pydantic import ValidationError

        path = Path(path)
        if not path.is_file():
            raise SpecError(f"{path}: no such campaign spec file")
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise SpecError(f"{path}: not valid YAML ({describe_yaml_error(error)})") from None
        if not isinstance(content, dict):
            raise SpecError(f"{path}: a campaign spec is a YAML mapping of settings")
        system = content.get("system")
        if isinstance(system, dict):
            for key in ("starting_structures", "initial_data"):
                if isinstance(system.get(key), str):
                    system[key] = str((path.parent / system[key]).resolve())
        try:
            spec = cls.model_validate(content)
            spec.check_resources()
        except ValidationError as error:
            raise SpecError(f"{path}: {describe_validation_error(error)}") from None
        except ValueError as error:
            raise SpecError(f"{path}: {error}") from None
        return spec


class SpecError(ValueError):
    """A campaign spec that cannot be used; the message names the file and the setting."""


def describe_validation_error(error: Exception) -> str:
    """pydantic's errors as `setting.path: message` phrases, one per problem."""
    problems = []
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"]) or "spec"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown setting (check its spelling and section)"
        problems.append(f"{location}: {message}")
    return "; ".join(problems)


def describe_yaml_error(error: Exception) -> str:
    """A YAML parser error in one line: where, and what is wrong."""
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + (getattr(error, "problem", None) or type(error).__name__)
