"""DreamBooth evaluation harness: protocol -> grid of runs -> training, sampling, scoring -> CSVs and a report."""

__version__ = "0.1.0"
