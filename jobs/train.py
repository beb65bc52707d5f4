"""Ray job entrypoint for one training run: `python train.py --run-id N` (submitted by
`flawline train submit`, with this folder as the job's working directory)."""

import sys

from flawline.train.job import main

if __name__ == "__main__":
    sys.exit(main())
