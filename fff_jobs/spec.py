"""Settings of a campaign, as pydantic models: every default lives here and nowhere else.

Each stage of the loop has its own section; a later change composes them into the
campaign spec that users write in `workflows/*.yaml`. Unknown keys are rejected.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base of every settings section: unknown keys are an error, values are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --- model and training (MACE committee) ---


# --- reference calculations, structures, MD sampling, audits, selection ---
