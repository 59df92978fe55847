"""Flatness estimators: local energy (MATH.md §1)."""
from flatcli.measure.local_energy import EnergyPoint, LocalEnergy, local_energy, parse_sigmas
