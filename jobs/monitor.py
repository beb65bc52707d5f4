"""Ray job entrypoint: publish flawline's catalog gauges (label queue depth, labels pulled, runs,
production metrics) as Ray metrics until stopped (submitted by `flawline monitor start`)."""

import os
import sys
import tempfile

# Ray unpacks this folder (the job's working_dir) once per package and may unpack it again while the
# job runs, when another job's driver starts with the same package: a driver standing in the old
# folder then fails on its next relative path (its own __file__ is relative). Stand elsewhere first.
os.chdir(tempfile.gettempdir())

from flawline.monitoring.job import main  # noqa: E402  (after the chdir above)

if __name__ == "__main__":
    sys.exit(main())
