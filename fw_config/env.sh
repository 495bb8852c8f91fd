# Source me (`source fw_config/env.sh`; .venv/bin/activate does it): points lpad,
# rlaunch, qlaunch and jobflow at this project's configuration.
FFF_PROJECT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
export FFF_PROJECT_DIR
export FW_CONFIG_FILE="$FFF_PROJECT_DIR/fw_config/FW_config.yaml"
# `fff init --uri` keeps the server's URI (credentials included) in git-ignored files
# readable by you only: FireWorks finds its LaunchPad there through CONFIG_FILE_DIR in
# FW_config.yaml (qadapters pass FFF_LAUNCHPAD_FILE with -l), jobflow through
# JOBFLOW_CONFIG_FILE.
FFF_PRIVATE="$FFF_PROJECT_DIR/.fff/private"
if [ -f "$FFF_PRIVATE/my_launchpad.yaml" ]; then
  export FFF_LAUNCHPAD_FILE="$FFF_PRIVATE/my_launchpad.yaml"
else
  export FFF_LAUNCHPAD_FILE="$FFF_PROJECT_DIR/my_launchpad.yaml"
fi
if [ -f "$FFF_PRIVATE/jobflow.yaml" ]; then
  export JOBFLOW_CONFIG_FILE="$FFF_PRIVATE/jobflow.yaml"
else
  export JOBFLOW_CONFIG_FILE="$FFF_PROJECT_DIR/fw_config/jobflow.yaml"
fi
unset FFF_PRIVATE
# Where rlaunch is, remembered once: a batch job's login shell may reset PATH, and the
# qadapters put this directory back in front (sbatch and qsub -V pass the variable on).
if [ -z "${FFF_PYTHON_BIN:-}" ] && command -v rlaunch >/dev/null; then
  FFF_PYTHON_BIN="$(dirname "$(command -v rlaunch)")"
  export FFF_PYTHON_BIN
fi
# The embedded store's file must exist (holding {}) before FireWorks starts.
if grep -q '^MONGOMOCK_SERVERSTORE_FILE:' "$FW_CONFIG_FILE"; then
  export MONGOMOCK_SERVERSTORE_FILE="$FFF_PROJECT_DIR/$(sed -n 's/^MONGOMOCK_SERVERSTORE_FILE: *//p' "$FW_CONFIG_FILE")"
  mkdir -p "$(dirname "$MONGOMOCK_SERVERSTORE_FILE")"
  [ -s "$MONGOMOCK_SERVERSTORE_FILE" ] || echo '{}' > "$MONGOMOCK_SERVERSTORE_FILE"
else
  unset MONGOMOCK_SERVERSTORE_FILE
fi
