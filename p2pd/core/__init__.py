"""The sans-IO core of p2pd: every decision, no I/O.

Nothing in this package touches sockets, files, clocks, threads or trio; inputs are
values (and ``now`` where time matters), outputs are values. The daemon (``p2pd.io``)
and the simulation (``simulations``) both drive it.
"""
