"""The entropic optimizers' defaults, in one torch-free place (the CLI's help reads them without importing torch).

Chosen for a small MLP / conv net, after Chaudhari et al. 2017 and Pittorino et al. 2021, and tuned on
flatcli's sweep (docs/reproduction/tuning.md) on the teacher set. On the real digits (`--data digits`, the
default of `flatcli train`) a quick measurement (3 seeds, 10 epochs) found γ schedules from the balanced start
(flatcli.training.gamma) within the seeds' spread of these, so they stay the defaults.
"""
# Entropy-SGD (MATH.md §3)
ESGD_LR = 1.0               # η: outer step; 1 moves w all the way to the Langevin average μ
ESGD_LANGEVIN_LR = 0.25     # η': step of the inner Langevin chain
ESGD_LANGEVIN_STEPS = 2     # L: minibatch gradients per outer step
ESGD_GAMMA = 0.1            # γ_0: coupling of w' to w
ESGD_NOISE = 1e-4           # ε: thermal noise of the Langevin chain
ESGD_ALPHA = 0.75           # α: averaging factor of μ
# replicated SGD (MATH.md §4)
RSGD_LR = 0.1               # η: SGD step of every replica (the same as SGD's, so the two compare at one step size)
RSGD_COUPLING = 0.1         # γ_0: pull of each replica to the center (η γ_0 per step sets how fast they meet)
RSGD_COUPLING_EVERY = 1     # K: couple every K steps, with a K times stronger pull
# both: γ scoping γ_t = γ_0 (1 + γ_1)^t, t = optimizer steps already completed (0 at the first step); off
GAMMA_GROWTH = 0.0
