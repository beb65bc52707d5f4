"""``python -m flawline.cli``: the same as the ``flawline`` command."""

from flawline.cli.main import main

main()
