# Source me (`source fw_config/env.sh`; .venv/bin/activate does it): points lpad,
# rlaunch, qlaunch and jobflow at this project's configuration.
FFF_PROJECT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
export FFF_PROJECT_DIR
export FW_CONFIG_FILE="$FFF_PROJECT_DIR/fw_config/FW_config.yaml"
export JOBFLOW_CONFIG_FILE="$FFF_PROJECT_DIR/fw_config/jobflow.yaml"
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
