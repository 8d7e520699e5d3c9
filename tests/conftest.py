import os

# Two torch threads on this 2-vCPU machine can run small-op loops many times slower than one
# when the vCPUs share a core; passive waiting avoids the spin.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
