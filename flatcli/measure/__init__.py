"""Flatness estimators: local energy (MATH.md §1) and local entropy (§2)."""
from flatcli.measure.local_energy import EnergyPoint, EnergySettings, LocalEnergy, local_energy, parse_sigmas
from flatcli.measure.local_entropy import (EntropySettings, LocalEntropyResult, LocalEntropyRow, local_entropy,
                                           parse_gammas)
