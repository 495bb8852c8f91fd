"""Test only (tests/test_campaign.py puts this directory on PYTHONPATH for CPU workers).

With ``FFF_TEST_HEAVY_MODULES`` set, a worker appends to that file, when it exits,
which of torch, mace and e3nn it loaded ("none" if it loaded none of them).
"""

import atexit
import os
import sys


def _record() -> None:
    loaded = [name for name in ("torch", "mace", "e3nn") if name in sys.modules]
    with open(os.environ["FFF_TEST_HEAVY_MODULES"], "a") as record:
        record.write(f"{os.getpid()}: {' '.join(loaded) or 'none'}\n")


if os.environ.get("FFF_TEST_HEAVY_MODULES"):
    atexit.register(_record)
