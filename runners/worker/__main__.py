"""`python -m runners.worker`: the RunPod worker (the Dockerfile's CMD, the SDK's local test modes)."""

from .handler import main

main()
