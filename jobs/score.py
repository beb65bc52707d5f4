"""Ray job entrypoint: score an image pool with a registered model (submitted by the active-learning
loop, with this folder as the job's working directory)."""

import sys

from flawline.active.score_job import main

if __name__ == "__main__":
    sys.exit(main())
