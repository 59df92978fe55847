"""Flatness estimators: local energy (MATH.md §1), local entropy (§2), sharpness, PAC-Bayes flatness and compare (§6)."""
from flatcli.measure.local_energy import EnergyPoint, EnergySettings, LocalEnergy, local_energy, parse_sigmas
from flatcli.measure.local_entropy import (EntropySettings, LocalEntropyResult, LocalEntropyRow, local_entropy,
                                           parse_gammas)
from flatcli.measure.sharpness import SharpnessResult, SharpnessSettings, sharpness
from flatcli.measure.pac_bayes import PacBayesResult, PacBayesSettings, pac_bayes_sigma
from flatcli.measure.compare import CompareResult, Subject, compare
