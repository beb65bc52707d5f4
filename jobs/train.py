"""Ray job entrypoint for one training run: `python train.py --run-id N` (`flawline train submit`
runs the same code as `python -m flawline.train.job`)."""

import os
import sys
import tempfile

# Stand outside this folder: a relative path must not depend on where the script lies.
os.chdir(tempfile.gettempdir())

from flawline.train.job import main  # noqa: E402  (after the chdir above)

if __name__ == "__main__":
    sys.exit(main())
