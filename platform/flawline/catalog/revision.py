"""Write a new migration by comparing the models with an up-to-date catalog (developer tool).

    FLAWLINE_CATALOG_URL=sqlite:////tmp/rev.db python -m flawline.catalog.revision "what changed"
"""

from __future__ import annotations

import sys

from alembic import command

from flawline.catalog.db import alembic_config, make_engine
from flawline.config import get_settings


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m flawline.catalog.revision MESSAGE")
    engine = make_engine(str(get_settings().catalog_url))
    command.revision(alembic_config(engine), message=argv[0], autogenerate=True)


if __name__ == "__main__":
    main(sys.argv[1:])
