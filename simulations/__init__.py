"""Discrete-event simulation of p2pd clusters: the real ``p2pd.core`` on a virtual network.

``engine`` (clock and event heap), ``network`` (max-min fair flows), ``node`` (one host
driving the core classes the way ``p2pd.io.swarm`` does), ``cluster`` (scenarios, runs,
results, the Kumar-Ross bound); ``python -m simulations run --help`` for the CLI.
"""
