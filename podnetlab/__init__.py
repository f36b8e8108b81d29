"""The lab: simulated pods (real netns and veths) for the demo, tests and benchmarks.

Not part of the daemon: `podnetmon lab` imports it, the daemon never does.
"""
