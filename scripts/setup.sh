#!/usr/bin/env bash
# Creates .venv with everything fff-jobs needs; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || python3 -m venv .venv
# The CPU build of torch lies on disk; it must come before mace-torch pulls any torch.
.venv/bin/pip install --quiet "torch==2.13.0"
.venv/bin/pip install --quiet -e ".[${FFF_EXTRAS:-pyscf}]"
# `source .venv/bin/activate` also points lpad, rlaunch, qlaunch and jobflow at this project.
grep -q "fw_config/env.sh" .venv/bin/activate ||
  printf '\nsource "%s/fw_config/env.sh"\n' "$PWD" >> .venv/bin/activate
