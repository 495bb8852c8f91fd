"""fff-jobs: active learning of MACE committees as a self-growing FireWorks workflow."""

__version__ = "0.1.0"
