"""Ray job entrypoint: publish flawline's catalog gauges (label queue depth, labels pulled, runs,
production metrics) as Ray metrics until stopped (submitted by `flawline monitor start`)."""

import sys

from flawline.monitoring.job import main

if __name__ == "__main__":
    sys.exit(main())
