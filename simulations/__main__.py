"""``python -m simulations ...``: the commands are in :mod:`simulations.cli`.

Before it imports them, this loads the compiled build of the hot modules if one exists
for the current sources (``python -m simulations build``; :mod:`simulations.compiled`).
"""

import sys

from simulations import compiled

if __name__ == "__main__":
    if sys.argv[1:2] != ["build"]:
        compiled.activate()
    from simulations.cli import main

    sys.exit(main())
