"""``python -m simulations ...``: the commands are in :mod:`simulations.cli`.

Before it imports them, ``run`` and ``sweep`` restart on transparent huge pages where
the machine allows (:mod:`simulations.hugepages`), and every command but ``build`` loads
the compiled build of the hot modules if one exists for the current sources
(``python -m simulations build``; :mod:`simulations.compiled`).
"""

import sys

from simulations import compiled, hugepages

if __name__ == "__main__":
    if sys.argv[1:2] in (["run"], ["sweep"]):
        hugepages.reexec()
    if sys.argv[1:2] != ["build"]:
        compiled.activate()
    from simulations.cli import main

    sys.exit(main())
