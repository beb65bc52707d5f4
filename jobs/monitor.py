"""Ray job entrypoint: publish flawline's catalog gauges (label queue depth, labels pulled, runs,
production metrics) as Ray metrics until stopped (submitted by `flawline monitor start`)."""

import os
import sys
import tempfile

# Stand outside this folder: a relative path must not depend on where the script lies.
os.chdir(tempfile.gettempdir())

from flawline.monitoring.job import main  # noqa: E402  (after the chdir above)

if __name__ == "__main__":
    sys.exit(main())
