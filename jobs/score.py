"""Ray job entrypoint: score an image pool with a registered model (submitted by the active-learning
loop; flawline itself runs the same code as `python -m flawline.active.score_job`)."""

import os
import sys
import tempfile

# Stand outside this folder: a relative path must not depend on where the script lies.
os.chdir(tempfile.gettempdir())

from flawline.active.score_job import main  # noqa: E402  (after the chdir above)

if __name__ == "__main__":
    sys.exit(main())
