"""flatcli: train networks with SGD, Entropy-SGD and replicated SGD, and measure how flat their minima are."""
__version__ = "0.1.0"
